"""`owngpt demo` end to end on the bundled Tang poems, shortened to a few steps."""

import subprocess
import sys

from owngpt.checkpoint import is_checkpoint, read_meta


def test_demo_prepares_trains_samples_and_leaves_a_checkpoint(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "owngpt",
            "demo",
            "--corpus",
            "tang",
            "--out",
            str(out),
            "--max-steps",
            "4",
            "--samples",
            "1",
            "--max-new-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--- sample 1 ---\n床前明月光，" in r.stdout
    assert "owngpt chat" in r.stdout and "owngpt serve" in r.stdout  # what to do next
    ckpt = out / "run" / "checkpoints" / "best"
    assert is_checkpoint(ckpt) and read_meta(ckpt)["task"] == "lm"
    # the checkpoint states the context it was trained for (the tiny preset has 256 positions, the demo's block 128)
    import json

    assert read_meta(ckpt)["trained_context"] == 128
    assert json.loads((ckpt / "generation_config.json").read_text())["max_length"] == 128
    assert (out / "run" / "loss.png").exists() and (out / "data" / "report.json").exists()
    # the checkpoint works in transformers alone
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
        "t = AutoTokenizer.from_pretrained(sys.argv[1]); m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
        "ids = t('春眠不觉晓', return_tensors='pt').input_ids; assert torch.isfinite(m(ids).logits).all()"
    )
    r2 = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True)
    assert r2.returncode == 0, r2.stderr[-2000:]
