"""The logit lens (qdemo.probes.lens) on tiny models of every family.

Oracles, independent of the lens's hooks: the model's own logits from one plain forward (the last row), and for
every earlier row a copy of the model cut after that layer (its own final norm and lm_head then give exactly
that layer's lens); the attention-sublayer rows use a cut copy whose last MLP outputs zeros."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from qdemo.probes.lens import logit_lens, row_names
from tests.family_checkpoints import load_family_models

FAMILIES = ["qwen2", "qwen", "baichuan", "baichuan2", "baichuan-13b", "baichuan2-13b"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return load_family_models(tmp_path_factory.mktemp("lens-families"))


def sequence(lm, n: int = 14) -> list[int]:
    ids = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. 你好，世界！ def f(x): return x",
                              add_special_tokens=False)
    assert len(ids) >= n
    return ids[:n]


class _Zero(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def cut_probs(lm, ids, layers: int, drop_last_mlp: bool = False) -> torch.Tensor:
    """softmax of a copy of the model that keeps only its first `layers` layers (0: the embeddings alone)."""
    model = copy.deepcopy(lm.model)
    model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:layers])
    if drop_last_mlp:
        model.model.layers[-1].mlp = _Zero()
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    return torch.softmax(logits, -1)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_row_matches_a_cut_model(models, family):
    lm = models[family]
    ids = sequence(lm)
    positions = [3, 7, len(ids) - 1]
    grid = logit_lens(lm, ids, positions, sublayers=True, top=5, chunk=5)  # chunks cross the positions
    layers = lm.model.config.num_hidden_layers
    assert grid.rows == row_names(layers, True) and grid.rows[-1] == f"L{layers - 1}"
    for r, name in enumerate(grid.rows):
        if name == "embed":
            want = cut_probs(lm, ids, 0)
        elif name.endswith(" attn"):
            want = cut_probs(lm, ids, int(name[1:].split()[0]) + 1, drop_last_mlp=True)
        else:
            want = cut_probs(lm, ids, int(name[1:]) + 1)
        for c, p in enumerate(positions):
            values, indices = torch.topk(want[p], 5)
            np.testing.assert_allclose(grid.top_probs[r, c], values.numpy(), atol=2e-5, err_msg=f"{family} {name}")
            assert grid.top_ids[r, c, 0] == int(indices[0]), (family, name, p)
            if p + 1 < len(ids):
                assert grid.target_probs[r, c] == pytest.approx(float(want[p, ids[p + 1]]), abs=2e-5)
            else:
                assert np.isnan(grid.target_probs[r, c]) and grid.targets[c] == -1


@pytest.mark.parametrize("family", FAMILIES)
def test_last_row_is_the_models_own_logits(models, family):
    lm = models[family]
    ids = sequence(lm)
    grid = logit_lens(lm, ids, range(len(ids)), top=3)
    with torch.inference_mode():
        probs = torch.softmax(lm.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    np.testing.assert_allclose(grid.top_probs[-1], torch.topk(probs, 3).values.numpy(), atol=2e-5)
    assert grid.top1[-1].tolist() == probs.argmax(-1).tolist()


def test_commitment_and_stays_from(models):
    lm = models["qwen2"]
    ids = sequence(lm)
    grid = logit_lens(lm, ids, range(len(ids) - 1), top=3)
    for c in range(len(grid.positions)):
        tops = [int(grid.top1[r, c]) for r in grid.layer_rows]
        hits = [r for r, t in zip(grid.layer_rows, tops) if t == grid.targets[c]]
        assert grid.commitment(c) == (hits[0] if hits else None)
        stays = grid.stays_from(c)
        if stays is None:
            assert tops[-1] != grid.targets[c]
        else:
            assert all(int(grid.top1[r, c]) == grid.targets[c] for r in grid.layer_rows if r >= stays)
    # The model's own greedy continuation is top-1 in the last row, so it is committed by the last layer.
    forced = ids[:5] + [int(grid.top1[-1, 4])]
    g2 = logit_lens(lm, forced, [4], top=3)
    assert g2.stays_from(0) is not None and g2.commitment(0) is not None
    frame = grid.to_frame(lm.tokenizer.get_vocab() and {i: lm.tokenizer.decode([i]) for i in set(ids)})
    assert len(frame) == len(grid.rows) * len(grid.positions)
    assert set(frame.columns) >= {"row", "position", "top1", "top1_prob", "target_prob", "commitment"}


def test_hooks_are_gone_and_the_gate_is_taken(models):
    lm = models["qwen2"]
    ids = sequence(lm)
    entries = []

    class Lock:
        def __enter__(self):
            entries.append(1)

        def __exit__(self, *exc):
            return False

    logit_lens(lm, ids, [2, 9], lock=Lock, chunk=4, sublayers=True)
    assert len(entries) == 3  # chunks [0,4) [4,8) [8,10): nothing past the last position is run
    modules = [lm.model.model.get_input_embeddings(), *lm.model.model.layers,
               *(layer.self_attn for layer in lm.model.model.layers)]
    assert all(not m._forward_hooks and not m._forward_pre_hooks or _only_guard(m) for m in modules)


def _only_guard(module) -> bool:
    # The pool's forward guard is the one pre-hook a pooled model may carry; these models are not pooled.
    return not module._forward_hooks and len(module._forward_pre_hooks) <= 1


def test_bad_positions_name_the_model(models):
    lm = models["qwen2"]
    with pytest.raises(ValueError, match="tiny-qwen2.*0..3"):
        logit_lens(lm, [1, 2, 3, 4], [4])
    with pytest.raises(ValueError, match="at least one position"):
        logit_lens(lm, [1, 2, 3, 4], [])


def test_json_has_no_nan_where_the_sequence_ends(models):
    import json

    lm = models["qwen2"]
    ids = sequence(lm)
    grid = logit_lens(lm, ids, [2, len(ids) - 1], top=3)

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    data = json.loads(grid.to_json(), parse_constant=refuse)
    assert all(row[-1] is None and row[0] is not None for row in data["target_probs"])
