"""tools/rehearse.py end to end at a toy shape: train at TP=2 (torchrun, gloo), resume at TP=1 from
the layout-free checkpoint, export to HF; its table, JSON and memory comparison. (The 1.7B run
itself is not in CI: README "Rehearsal at the 1.7B shape".)"""

import json
import subprocess
import sys

import pytest

from train_helpers import repo_root

TOY = ["model.hidden_size=64", "model.ffn_hidden_size=256", "model.num_attention_heads=2",
       "model.num_query_groups=2", "model.kv_channels=32", "model.vocab_size=512", "model.effective_layers=5"]


@pytest.mark.distributed
def test_rehearsal_at_a_toy_shape(tmp_path):
    out = tmp_path / "rehearsal"
    result = subprocess.run(
        [sys.executable, "tools/rehearse.py", "--config", "configs/mor_1_7b_nr3.yaml", "--seq-length", "32",
         "--out", str(out), "--max-rss-gib", "8", *TOY],
        capture_output=True, text=True, cwd=repo_root(), timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "rehearsal.json").read_text())
    assert report["failed"] is None
    assert [p["phase"] for p in report["phases"]] == ["train-tp2", "resume-tp1", "export", "load-hf"]
    train, resume, export, load = report["phases"]
    assert [r["rank"] for r in train["ranks"]] == [0, 1] and [r["rank"] for r in resume["ranks"]] == [0]
    assert all(r["peak_rss_bytes"] > 0 for p in report["phases"] for r in p["ranks"])
    # the TP=1 run resumed from the layout-free form and trained its own step
    assert report["resumed_layout_free"]
    assert "step 3/3" in (out / "resume-tp1.log").read_text()
    # parameters, gradients and optimizer state within 10% of model_report's estimate, every rank
    rows = [row for phase in report["memory_vs_estimate"].values() for row in phase["rows"]]
    assert len(rows) == 3 * 3 and all(row["holds"] for row in rows), rows
    assert export["within_bound"] and export["largest_group"] == "embedding.word_embeddings.weight"
    table = result.stdout
    assert "train-tp2" in table and "resume-tp1" in table and "export peak" in table and " NO" not in table
    # transformers' own loader took the export: every parameter, one forward of finite logits
    assert load["holds"] and load["loaded_parameters"] == report["parameters"] and load["logits_finite"]
    assert load["loaded_class"] == "MoRForCausalLM" and load["logits_shape"] == [1, 8, 512]
    assert "transformers loaded MoRForCausalLM" in table and ": ok" in table


def test_streamed_safetensors_are_byte_identical_to_save_file(tmp_path):
    """The export writes tensor by tensor (`SafetensorsWriter`); its files are safetensors' own bytes."""
    import torch
    from safetensors.torch import save_file

    from mor_megatron.hf.safetensors_io import INDEX, write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"b.w": torch.randn(3, 5, generator=g).bfloat16(), "a.x": torch.randn(7, generator=g),
               "c": torch.arange(5), "d": torch.randn(2, 2, generator=g).half(), "aa": torch.ones(1, 3).bfloat16()}
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    (tmp_path / "one").mkdir()
    assert write_safetensors(tensors, tmp_path / "one", 10**9) == ["model.safetensors"]
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    (tmp_path / "shards").mkdir()
    names = write_safetensors(tensors, tmp_path / "shards", 40)  # name order, a new file past 40 bytes
    index = json.loads((tmp_path / "shards" / INDEX).read_text())
    assert len(names) == 4 and index["metadata"]["total_size"] == 28 + 6 + 30 + 40 + 8
    for name in names:
        shard = {key: tensors[key] for key, file in index["weight_map"].items() if file == name}
        save_file(shard, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
        assert (tmp_path / "shards" / name).read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
