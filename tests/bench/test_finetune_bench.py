"""The fine-tuning benchmarks (#26): the computed memory table adds up; the LoRA concept measure runs at toy size."""

from __future__ import annotations

import json
import tarfile

import pytest

from bench import finetune_memory, lora_concept


def test_memory_rows_add_up_for_sd15():
    rows = finetune_memory.rows(batch=1, side=8, ranks=(4,))
    full = [r for r in rows if r["what"] == "full, AdamW"]
    n = full[0]["trained"]
    assert n == 859_520_964  # SD 1.5's UNet2DConditionModel, the base preset's layout
    assert full[0]["static"] == 20 * n  # fp32 weights, gradients, EMA and AdamW's two fp32 moments
    eight = next(r for r in rows if r["what"] == "full, AdamW8bit")
    assert eight["static"] == 14 * n
    lora = next(r for r in rows if r["what"].startswith("LoRA"))
    assert 0 < lora["trained"] < n / 500 and lora["static"] == 4 * n + 16 * lora["trained"]
    off, on = (next(r["act"] for r in full if r["checkpointing"] == c) for c in ("off", "on"))
    assert 0 < on < off


def test_activations_grow_with_the_batch_and_the_latent_side():
    cfg = finetune_memory.load_preset(finetune_memory.PriorConfig, finetune_memory.PRESETS, "base").model
    one, _, _ = finetune_memory.activation_bytes(cfg, 1, 8)
    two, _, _ = finetune_memory.activation_bytes(cfg, 2, 8)
    wider, _, _ = finetune_memory.activation_bytes(cfg, 1, 16)
    assert two == pytest.approx(2 * one, rel=0.01) and wider > 3 * one


def test_the_users_folder_and_the_prompt_sets_split_on_the_colour(tmp_path):
    sets = lora_concept.prompt_sets(tmp_path, 6, seed=0)
    for key, folder in sets.items():
        assert json.loads((folder / "info.json").read_text())["splits"]["test"] == 6
        firsts = []
        for shard in folder.glob("test-*.tar"):
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".json"):
                        firsts.append(json.loads(tar.extractfile(member).read())["shapes"][0]["color"])
        assert len(firsts) == 6 and all((c == "purple") == (key == "purple") for c in firsts)
    data = lora_concept.user_folder(tmp_path, 20, seed=0)
    captions = sorted((tmp_path / "purple_folder").glob("*.txt"))
    assert len(captions) == 20 and all("purple" in c.read_text() for c in captions)
    assert (data / "info.json").exists()
    # --replay: the old colours mixed into the same folder, none of them purple.
    lora_concept.user_folder(tmp_path, 20, seed=0, replay=10)
    mixed = sorted((tmp_path / "purple_folder_replay10").glob("*.txt"))
    old = [c for c in mixed if c.name.startswith("old")]
    assert len(mixed) == 30 and len(old) == 10 and not any("purple" in c.read_text() for c in old)


@pytest.mark.slow
def test_lora_concept_runs_at_toy_size(tmp_path):
    result = lora_concept.main(["--scale", "toy", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "r.json")])
    assert [r["model"] for r in result["rows"]] == ["before (the prior)", "LoRA", "full fine-tune"]
    assert all(0 <= r[k][a] <= 1 for r in result["rows"] for k in ("purple", "other") for a in ("all", "color"))
    assert result["sizes"]["LoRA file"] < result["sizes"]["full fine-tune UNet (EMA or model)"] / 10
    assert json.loads((tmp_path / "r.json").read_text())["scale"] == "toy"
