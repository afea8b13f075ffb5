"""The memory plan: what a real-size Loc3R-VLM needs on each Jetson, and the refusal of a
target it cannot fit (predicted from the config alone, so no 7B weights are needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import save_file

from loc3r.engines.targets import load_target
from loc3r.errors import InputError
from loc3r.export import cli as export_cli
from loc3r.export.llm import llm_form
from loc3r.export.memory_plan import GIB, check_fits, memory_plan, predicted_decoder_bytes, predicted_weights
from loc3r.models.config import Loc3rConfig
from loc3r.models.tiny import ensure_tiny_bundle

REAL = Loc3rConfig(model_id="loc3r-7b-shapes", random_weights=True)  # Qwen2-7B, SigLIP so400m, CUT3R 512
TOKENS_PER_FRAME = 211
KV_FP16_PER_TOKEN = 28 * 2 * 4 * 128 * 2  # layers x (k, v) x kv heads x head dim x bytes


def _plan(target_name: str, quant: str | None = None, context: int = 8192):  # noqa: ANN202
    target = load_target(target_name)
    form = llm_form(target, quant or target.llm.weights)
    return memory_plan(REAL, target, predicted_weights(REAL, target, form), form, context, (384, 512), "predicted"), form


def _item(plan, prefix: str) -> int:  # noqa: ANN001
    (item,) = [i for i in plan.items if i.name.startswith(prefix)]
    return item.bytes


@pytest.mark.parametrize("target", ["jetson-orin", "orin-nx", "orin-nano"])
def test_real_size_plan_per_jetson(target: str) -> None:
    plan, form = _plan(target)
    assert plan.budget == int((load_target(target).hardware.memory_gb - 1.0) * GIB)
    assert _item(plan, "KV cache (fp16, 8192 tokens)") == 8192 * KV_FP16_PER_TOKEN == 469_762_048
    assert _item(plan, "weights: llm decoder") == predicted_decoder_bytes(REAL.llm, form)
    assert _item(plan, "weights: llm embedding table") == 152064 * 3584 * 2
    # int4, block 128, fp16 scales: 4.125 bits per weight; lm_head fp16 (AGX, NX) or int4 (Nano)
    body = 28 * (3584 * 4608 + 3584 * 3584 + 3 * 3584 * 18944) * 4.125 / 8
    head = 3584 * 152064 * (2 if form.lm_head == "fp16" else 4.125 / 8)
    assert _item(plan, "weights: llm decoder") == pytest.approx(body + head, rel=0.01)
    assert plan.fits == (target != "orin-nano")
    assert plan.to_dict()["total_bytes"] == sum(i.bytes for i in plan.items)


def test_orin_nano_is_refused_with_the_numbers_and_the_ways_out() -> None:
    plan, _ = _plan("orin-nano")
    with pytest.raises(InputError) as refused:
        check_fits(plan, REAL, TOKENS_PER_FRAME, "int4")
    message = str(refused.value)
    assert f"needs {plan.total / GIB:.2f} GiB" in message and "but 7.00 GiB is available" in message
    assert "weights: llm decoder 3." in message
    assert "a module with more memory (" in message and "orin-nx" in message and "--llm int4" not in message


def test_a_smaller_context_is_offered_when_it_is_enough() -> None:
    plan, _ = _plan("x86-cuda", "fp16", context=131072)  # fp16 weights (13 GiB) + a 128k-token KV cache
    assert not plan.fits
    with pytest.raises(InputError) as refused:
        check_fits(plan, REAL, TOKENS_PER_FRAME, "fp16")
    fix = refused.value.fix
    assert "--llm int4" in fix
    context = int(fix.split("--context-tokens ")[1].split()[0])
    smaller, _ = _plan("x86-cuda", "fp16", context=context)
    assert smaller.fits and not _plan("x86-cuda", "fp16", context=context + 1)[0].fits


def test_export_refuses_a_target_the_model_cannot_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bundle with the real sizes is refused for the Orin Nano before anything is written
    (its weights are never read: the plan is predicted from config.json)."""
    bundle = tmp_path / "real-shapes"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(REAL.to_dict()))
    shutil.copy(ensure_tiny_bundle() / "tokenizer.json", bundle / "tokenizer.json")
    save_file({}, str(bundle / "model.safetensors"))
    out = tmp_path / "nano"
    assert export_cli.main(["--model", str(bundle), "--target", "orin-nano", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "loc3r-7b-shapes does not fit target orin-nano: it needs 8.84 GiB" in err and "7.00 GiB is available" in err
    assert not out.exists()
