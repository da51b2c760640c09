"""`patterncc check`: the JSON document (documented in docs/check-json.md), the text report, and user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import patterncc
from patterncc.cli import main
from patterncc.mask import pattern_mask
from patterncc.runtime.tiles import single_threaded

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
TWO_PATTERNS = ("pattern a(w = 2) { causal\n head x = local(w) }\n"
                "pattern b(l = 4) { causal\n head y = stride(l)\n head z = local(l) }\n")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Reference masks are many tiny torch ops, which stall with two threads on a busy 2-core machine."""
    with single_threaded():
        yield


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def check_json(capsys, *argv) -> dict:
    code, out, err = run(capsys, "check", *argv, "--json")
    assert code == 0, err
    return json.loads(out)


HEAD_KEYS = {"name", "group", "h", "count", "family", "rows", "nonzeros", "density", "empty_rows", "first_empty_row",
             "layout", "cost", "permutation", "cache"}
TOP_KEYS = {"pattern", "file", "n", "layer", "causal", "block", "combine", "params", "lets", "allowed_pairs", "heads",
            "union", "layer_heads", "coverage", "warnings", "notes", "set_heads"}
COVERAGE_KEYS = {"status", "steps", "max_steps", "fractions", "covered_pairs", "witness", "sequence", "note"}


def test_json_keys_and_values_for_strided(capsys):
    n, l = 200, 7  # noqa: E741 - neither a multiple of the other, nor of the block
    document = check_json(capsys, EXAMPLES_DIR / "strided.attn", "--n", n, "-D", f"l={l}")
    assert document["schema_version"] == 2
    (result,) = document["patterns"]
    assert set(result) == TOP_KEYS
    assert (result["pattern"], result["n"], result["causal"], result["block"]) == ("strided", n, True, 64)
    assert result["params"] == {"l": l} and result["allowed_pairs"] == n * (n + 1) // 2
    heads = {h["name"]: h for h in result["heads"]}
    assert set(heads) == {"local", "stride"} and all(set(h) == HEAD_KEYS for h in heads.values())
    # Keys a KV cache keeps while generating: the window, and every key for the stride head.
    assert heads["local"]["cache"] == {"formula": "Min(n, l + 1)", "value": l + 1}
    assert heads["stride"]["cache"] == {"formula": "n", "value": n}
    mask = pattern_mask(patterncc.parse(EXAMPLES_DIR / "strided.attn", l=l), n)
    for index, name in enumerate(["local", "stride"]):
        rows = mask[index].sum(dim=1)
        assert heads[name]["rows"] == {"min": int(rows.min()), "mean": int(rows.sum()) / n, "max": int(rows.max())}
        assert heads[name]["nonzeros"] == int(rows.sum())
    union = result["union"]
    assert union["nonzeros"] == int(mask.any(dim=0).sum()) and union["count"] == 2
    assert union["cost"]["formula"] == "l + 2 + n/l" and union["cost"]["order"] == "O(n)"
    assert union["cost"]["value"] == l + 2 + n / l
    # local(7), causal, 4 tiles of 64: the diagonal tiles and the 3 just below it (a window of 7 reaches back
    # across each tile boundary) are partial; nothing is full
    assert heads["local"]["layout"] == {"block": 64, "q_tiles": 4, "k_tiles": 4, "empty": 9, "partial": 7,
                                        "full": 0, "density": 7 / 16}
    permutation = heads["stride"]["permutation"]
    assert list(permutation["candidates"]) == ["7"] and permutation["density_before"] == heads["stride"]["layout"][
        "density"]
    assert heads["local"]["permutation"] == {"tile": 64, "density_before": 7 / 16, "density_after": None,
                                             "candidates": {}, "period": None, "formula": None}
    for key in ("merged", "declared_order"):
        coverage = result["coverage"][key]
        assert set(coverage) == COVERAGE_KEYS
        assert (coverage["status"], coverage["steps"], coverage["witness"]) == ("covered", 2, None)
        assert coverage["fractions"][-1] == 1.0 and coverage["covered_pairs"][-1] == n * (n + 1) // 2
    assert result["coverage"]["declared_order"]["sequence"] == ["local", "stride"]
    assert result["layer_heads"] == ["local", "stride"]
    # 4 tiles at n = 200: the module's kernels waste work (see test_wasted_kernel_work_warns), but no row is empty
    assert not [w for w in result["warnings"] if "attends to no key" in w]


def test_json_reports_failure_with_a_witness(capsys):
    document = check_json(capsys, EXAMPLES_DIR / "local.attn", "--n", 100, "-D", "w=4", "--max-steps", 3)
    coverage = document["patterns"][0]["coverage"]["merged"]
    assert coverage["status"] == "not_within_max_steps" and coverage["steps"] is None
    assert coverage["witness"] == [13, 0] and len(coverage["fractions"]) == 3 and coverage["max_steps"] == 3


def test_json_for_data_dependent_and_kernel_heads(capsys):
    reformer = check_json(capsys, EXAMPLES_DIR / "reformer.attn", "--n", 128)["patterns"][0]
    (lsh,) = reformer["heads"]
    assert (lsh["family"], lsh["count"], lsh["rows"], lsh["layout"], reformer["union"]) == ("hashed", 8, None, None,
                                                                                            None)
    assert lsh["cost"]["expected"] is True and lsh["cost"]["value"] == 512
    assert reformer["coverage"]["merged"]["status"] == "unknown" and reformer["notes"]
    linear = check_json(capsys, EXAMPLES_DIR / "linear.attn", "--n", 100)["patterns"][0]
    assert linear["heads"][0]["rows"] == {"min": 1, "mean": 50.5, "max": 100}
    assert linear["coverage"]["merged"]["steps"] == 1


def test_every_pattern_of_a_file_and_per_pattern_defines(capsys, tmp_path: Path):
    path = tmp_path / "two.attn"
    path.write_text(TWO_PATTERNS)
    document = check_json(capsys, path, "--n", 50, "-D", "l=5")
    assert [p["pattern"] for p in document["patterns"]] == ["a", "b"]
    assert document["patterns"][0]["params"] == {"w": 2} and document["patterns"][1]["params"] == {"l": 5}
    only_b = check_json(capsys, path, "--n", 50, "--pattern", "b")
    assert [p["pattern"] for p in only_b["patterns"]] == ["b"]


def test_layer_of_an_interleaved_pattern(capsys, tmp_path: Path):
    path = tmp_path / "inter.attn"
    path.write_text("pattern p() { causal combine interleaved\n head a[2] = local(2)\n head b[2] = stride(3) }\n")
    layer1 = check_json(capsys, path, "--n", 40, "--layer", 1)["patterns"][0]
    assert layer1["layer"] == 1 and layer1["layer_heads"] == ["b", "b", "b", "b"]


def test_text_report(capsys):
    code, out, err = run(capsys, "check", EXAMPLES_DIR / "strided.attn", "--n", 1024, "-D", "l=16")
    assert code == 0, err
    assert out.startswith("strided (")
    for text in ("Heads", "Coverage", "Permutations", "merged union", "declared order", "l + 2 + n/l", "O(n)",
                 "local -> stride", "grid transpose, period 16"):
        assert text in out, text


def test_empty_rows_warn_on_stderr(capsys):
    code, _, err = run(capsys, "check", EXAMPLES_DIR / "fixed.attn", "--n", 64, "-D", "l=16", "-D", "c=4")
    assert code == 0
    assert err.startswith("warning: pattern `fixed`, head `summary`: query i = 0 attends to no key (12 of 64 rows")


@pytest.mark.parametrize("argv, message", [
    (["-D", "unknown=3"], "pattern `strided` has no parameter `unknown`; its parameters are l"),
    (["-D", "l=0"], "must be positive"),
    (["--pattern", "nope"], "no pattern named `nope`"),
], ids=["unknown-parameter", "bad-value", "unknown-pattern"])
def test_user_errors_exit_2(capsys, argv, message):
    code, _, err = run(capsys, "check", EXAMPLES_DIR / "strided.attn", "--n", 64, *argv)
    assert code == 2 and "Traceback" not in err and message in err, err


def test_define_that_no_pattern_declares(capsys, tmp_path: Path):
    path = tmp_path / "two.attn"
    path.write_text(TWO_PATTERNS)
    code, _, err = run(capsys, "check", path, "--n", 50, "-D", "q=5")
    assert code == 2 and "no pattern in this file has a parameter `q`" in err, err


def test_every_json_key_is_documented(capsys):
    """docs/check-json.md documents the schema: every key the command emits appears there as `key`."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "check-json.md").read_text()
    documents = [check_json(capsys, EXAMPLES_DIR / name, "--n", 100) for name in ("strided.attn", "reformer.attn")]

    def keys(value, path=""):
        if isinstance(value, dict):
            for key, item in value.items():
                if path.endswith(("candidates", "params", "lets")):
                    continue  # keys of these maps are data (periods, parameter names), not schema
                yield key, f"{path}.{key}"
                yield from keys(item, f"{path}.{key}")
        elif isinstance(value, list):
            for item in value:
                yield from keys(item, path)

    missing = {where for document in documents for key, where in keys(document) if f"`{key}`" not in doc}
    assert not missing, f"undocumented keys: {sorted(missing)}"


# What the generated module computes (`set_heads`) -----------------------------------------------------------------

SET_HEAD_KEYS = {"name": str, "attention_heads": list, "masks": list, "computed_tiles": int, "total_tiles": int,
                 "dense_tiles": int, "nonzeros": int, "efficiency": float}
SET_MASK_KEYS = {"mask": int, "q_order": str, "k_order": str, "computed_tiles": int, "nonzeros": int,
                 "efficiency": float}


def test_set_heads_keys_types_and_efficiency(capsys):
    n, l = 1000, 16  # noqa: E741
    (result,) = check_json(capsys, EXAMPLES_DIR / "strided.attn", "--n", n, "-D", f"l={l}")["patterns"]
    block, tiles = result["block"], -(-n // result["block"])
    heads = {h["name"]: h for h in result["heads"]}
    assert [entry["name"] for entry in result["set_heads"]] == ["local", "stride"]
    for entry in result["set_heads"]:
        assert {key: type(value) for key, value in entry.items()} == SET_HEAD_KEYS, entry
        assert entry["total_tiles"] == tiles ** 2 and entry["dense_tiles"] == tiles * (tiles + 1) // 2
        assert entry["efficiency"] == pytest.approx(entry["nonzeros"] / (entry["computed_tiles"] * block ** 2),
                                                    rel=1e-12)
        assert entry["nonzeros"] == heads[entry["name"]]["nonzeros"]
        for mask in entry["masks"]:
            assert {key: type(value) for key, value in mask.items()} == SET_MASK_KEYS, mask
            assert mask["q_order"] == mask["k_order"] and mask["q_order"] in ("natural", "transposed")
            assert mask["efficiency"] == pytest.approx(mask["nonzeros"] / (mask["computed_tiles"] * block ** 2),
                                                       rel=1e-12)
        assert entry["computed_tiles"] == sum(m["computed_tiles"] for m in entry["masks"])
        assert entry["nonzeros"] == sum(m["nonzeros"] for m in entry["masks"])
    assert [h["attention_heads"] for h in result["set_heads"]] == [[0], [1]]
    # stride(16) at n = 1000 is visited as a 16-column grid read column by column: the transpose pays here
    assert result["set_heads"][1]["masks"][0]["q_order"] == "transposed"


def test_set_heads_of_local_match_a_dense_mask(capsys):
    n, w, block = 1000, 100, 64  # n not a multiple of the block: the last tiles hold padding
    (result,) = check_json(capsys, EXAMPLES_DIR / "local.attn", "--n", n, "-D", f"w={w}")["patterns"]
    (entry,) = result["set_heads"]
    assert entry["name"] == "window" and entry["attention_heads"] == [0, 1, 2, 3] and len(entry["masks"]) == 1
    dense = pattern_mask(patterncc.parse(EXAMPLES_DIR / "local.attn", w=w), n)
    tiles = -(-n // block)
    padded = torch.zeros(4, tiles * block, tiles * block, dtype=torch.bool)
    padded[:, :n, :n] = dense
    touched = padded.view(4, tiles, block, tiles, block).any(dim=4).any(dim=2)  # [head, q tile, k tile]
    for head in entry["attention_heads"]:
        assert entry["nonzeros"] == int(dense[head].sum())
        assert entry["computed_tiles"] == int(touched[head].sum())  # natural order: the tiles with an allowed pair
    (mask,) = entry["masks"]
    assert (mask["q_order"], mask["k_order"]) == ("natural", "natural")
    assert entry["total_tiles"] == tiles ** 2 and entry["dense_tiles"] == tiles * (tiles + 1) // 2
    assert entry["efficiency"] == pytest.approx(int(dense[0].sum()) / (int(touched[0].sum()) * block ** 2))
    assert result["warnings"] == []


@pytest.mark.parametrize("text, reason", [
    ("pattern p() { causal\n head a = where i == j or i - j == 100 }", "work efficiency 0.01"),
    ("pattern p(w = n // 2) { causal\n head a = local(w) }", "more than half the 136 causal tiles"),
], ids=["one-diagonal", "half-window"])
def test_wasted_kernel_work_warns(capsys, text, reason):
    code, out, err = run(capsys, "check", "--text", text, "--n", 1024, "--json")
    assert code == 0, err
    (result,) = json.loads(out)["patterns"]
    (warning,) = result["warnings"]
    assert warning.startswith("pattern `p`, head `a`: at n = 1024 its kernels compute") and reason in warning
    assert f"warning: {warning}" in err


def test_no_set_heads_and_lowering_failures(capsys):
    for name in ("reformer.attn", "linear.attn"):
        assert check_json(capsys, EXAMPLES_DIR / name, "--n", 128)["patterns"][0]["set_heads"] == []
    # The analysis takes a block size over n-dependent parameters; lowering refuses it: a note, not a failure.
    text = "pattern p(b = n // 4) { causal\n block b\n head a = local(2) }"
    (result,) = check_json(capsys, "--text", text, "--n", 256)["patterns"]
    assert result["set_heads"] is None and result["heads"][0]["nonzeros"] == 256 + 255 + 254
    assert any("lowering refused" in note and "block size must not depend on n" in note for note in result["notes"])
    code, out, err = run(capsys, "check", "--text", text, "--n", 256)
    assert code == 0 and "Block-sparse kernels" not in out and "lowering refused" in out and not err.strip()


def test_text_report_of_the_module(capsys):
    code, out, err = run(capsys, "check", EXAMPLES_DIR / "strided.attn", "--n", 1000, "-D", "l=16")
    assert code == 0 and not err.strip(), err
    for text in ("Block-sparse kernels (the generated module at n = 1000", "attention heads",
                 "natural / natural", "transposed / transposed", "dense (causal)"):
        assert text in out, text
