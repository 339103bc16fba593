"""The diffusion-fast command: generate, bench, check on the built-in tiny model, and its error paths."""
import csv
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from diffusion_fast.cli import main


def test_generate_default_model_compares_both_paths(tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "--steps", "2", "--output", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "fast path:" in text and "reference path:" in text and "max abs pixel difference" in text
    assert Image.open(out).size == (32, 32)


def test_generate_warms_both_paths_before_timing_them(tmp_path, monkeypatch, capsys):
    """The speedup compares sampling: each path first runs one untimed step, so the path timed first does not carry
    the one-time costs alone (a cold fast path printed 0.67x on a busy machine)."""
    from diffusion_fast import current_backend
    from diffusion_fast.pipeline import StableDiffusionPipeline

    calls, real = [], StableDiffusionPipeline.__call__

    def recording(self, *args, **kwargs):
        calls.append((current_backend(), kwargs["num_inference_steps"]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", recording)
    assert main(["generate", "--steps", "2", "--output", str(tmp_path / "img.png"), "--no-progress"]) == 0
    assert calls == [("fast", 1), ("reference", 1), ("fast", 2), ("reference", 2)]
    assert "warm-up (1 step per path" in capsys.readouterr().out


def test_generate_from_folder_batch(tmp_path, capsys):
    from diffusion_fast import tiny

    folder = tiny.write_tiny_pipeline(str(tmp_path / "model"), "sd2", seed=0)
    rc = main(["generate", "--model", folder, "--steps", "2", "--batch", "2", "--height", "48", "--width", "64",
               "--output", str(tmp_path / "o.png"), "--no-progress", "--prompt", "a cat"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "it/s" in text and "reference path" not in text
    assert Image.open(tmp_path / "o_1.png").size == (64, 48)


# the built-in model's scheduler is DDIM; the others are built from its config. Euler ancestral and the SDE
# DPM-Solver draw noise every step; PNDM keeps earlier model outputs; --karras changes the sigmas.
@pytest.mark.parametrize("choice, options, name", [
    ("euler-ancestral", [], "EulerAncestralDiscreteScheduler"),
    ("pndm", [], "PNDMScheduler"),
    ("dpm++-2m-sde", ["--karras"], "DPMSolverMultistepScheduler"),
    ("unipc", [], "UniPCMultistepScheduler"),
    ("lcm", ["--guidance", "1"], "LCMScheduler"),  # no CFG batch, as LCM-LoRA runs
    ("tcd", ["--guidance", "1", "--eta", "0.3"], "TCDScheduler"),  # TCD-LoRA's: eta is TCD's gamma
    ("heun", ["--karras"], "HeunDiscreteScheduler"),  # two UNet calls a step
    ("lms", ["--karras"], "LMSDiscreteScheduler"),  # "LMS Karras"
    ("dpm2-a", ["--karras"], "KDPM2AncestralDiscreteScheduler"),  # "DPM2 a Karras": the UNet at the midpoints too
    ("deis", [], "DEISMultistepScheduler"),  # earlier noise predictions kept
    ("dpm++-sde", ["--karras"], "DPMSolverSinglestepScheduler"),  # "DPM++ SDE Karras" as diffusers maps it
])
def test_generate_with_another_scheduler(tmp_path, capsys, choice, options, name):
    rc = main(["generate", "--scheduler", choice, *options, "--steps", "3", "--output", str(tmp_path / "a.png"),
               "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and f"scheduler {name}" in text and (tmp_path / "a.png").exists()
    assert "max abs pixel difference" in text  # the fast and reference paths agree with this scheduler too


def test_generate_keeps_an_edm_models_own_scheduler(tmp_path, capsys):
    """An EDM model (Playground v2.5's scheduler) runs on its own sampler; another --scheduler, built from its config,
    would sample on VP sigmas it was not trained on, and is refused in one line."""
    import diffusers

    import _tiny_diffusers

    pipe = _tiny_diffusers.pipeline("sd1", 0)
    pipe.scheduler = diffusers.EDMDPMSolverMultistepScheduler()
    pipe.save_pretrained(tmp_path / "edm")
    out = str(tmp_path / "e.png")
    assert main(["generate", "--model", str(tmp_path / "edm"), "--steps", "2", "--no-progress", "--output", out]) == 0
    assert "scheduler EDMDPMSolverMultistepScheduler" in capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "edm"), "--scheduler", "euler", "--steps", "2",
                 "--no-progress", "--output", out]) == 2
    assert "--scheduler euler would sample on sigmas it was not trained on" in capsys.readouterr().err


def test_generate_karras_sets_the_schedulers_field(monkeypatch, tmp_path):
    from diffusion_fast import pipeline

    seen = []
    real_call = pipeline.StableDiffusionPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(dict(self.scheduler.config))
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.StableDiffusionPipeline, "__call__", spy)
    assert main(["generate", "--scheduler", "dpm++-2m", "--karras", "--steps", "2", "--no-progress",
                 "--output", str(tmp_path / "k.png")]) == 0
    assert seen and all(c["use_karras_sigmas"] and c["algorithm_type"] == "dpmsolver++" for c in seen)


@pytest.mark.parametrize("options, guidance", [([], None), (["--guidance", "3"], 3.0)])
def test_generate_guidance_default_is_the_pipelines(monkeypatch, tmp_path, options, guidance):
    """Without --guidance the pipeline's own default applies (7.5 for SD, 5.0 for SDXL), as in diffusers."""
    from diffusion_fast import pipeline

    seen = []
    real_call = pipeline.StableDiffusionPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("guidance_scale"))
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.StableDiffusionPipeline, "__call__", spy)
    assert main(["generate", *options, "--steps", "1", "--no-progress", "--output", str(tmp_path / "g.png")]) == 0
    assert seen and all(g == guidance for g in seen)


@pytest.mark.parametrize("argv, message", [
    (["--scheduler", "euler", "--eta", "0.5"],
     "--eta is DDIM's and TCD's; the scheduler is EulerDiscreteScheduler (--scheduler ddim or tcd)"),
    (["--scheduler", "pndm", "--karras"],
     "--karras is for Euler, Heun, LMS, DPM2, DPM-Solver++, UniPC and DEIS; the scheduler is PNDMScheduler "
     "(--scheduler euler, heun, lms, dpm2, dpm2-a, dpm++-2m, dpm++-2m-sde, unipc or deis)"),
])
def test_scheduler_options_refused_before_loading(capsys, argv, message):
    assert main(["generate", *argv]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == f"diffusion-fast generate: error: {message}" and "loaded" not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--scheduler", "kdpm2"], "invalid choice"),
        (["generate", "--steps", "0"], "must be a positive integer"),
        (["generate", "--model", "/no/such/folder"], "does not exist"),
        (["check", "--model", "/no/such/folder"], "does not exist"),
        (["bench", "--config", "sdxxl"], "invalid choice"),
    ],
)
def test_bad_arguments_one_line_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("option", ["--csv", "--plot", "--jsonl"])
def test_bench_output_folder_missing_fails_before_the_run(option, capsys):
    assert main(["bench", option, "/no/such/folder/out.x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/no/such/folder/out.x" in err[0] and "does not exist" in err[0]


def test_generate_image_to_image(tmp_path, capsys):
    import numpy as np

    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out.png"
    assert main(["generate", "--image", str(image), "--strength", "0.5", "--steps", "4", "--output", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "fast path:      2 steps" in text and "max abs pixel difference" in text  # half of 4 steps, both paths
    assert Image.open(out).size == (40, 32)  # the input's size


@pytest.mark.parametrize("argv, message", [
    (["--strength", "0.5"], "--strength is for image-to-image: give --image too"),
    (["--image", "/no/such.png"], "--image: no such file: /no/such.png"),
    (["--image", "IMAGE", "--strength", "0"], r"--strength must be in \(0, 1\], got 0.0"),
    (["--image", "IMAGE", "--height", "64"], "--height/--width: with --image the output has the image's size"),
    (["--image", "NOT_AN_IMAGE"], "is not an image PIL can read"),
])
def test_generate_image_to_image_bad_options_one_line(tmp_path, capsys, argv, message):
    image, junk = tmp_path / "in.png", tmp_path / "junk.png"
    Image.new("RGB", (16, 16)).save(image)
    junk.write_text("not a png")
    argv = [{"IMAGE": str(image), "NOT_AN_IMAGE": str(junk)}.get(a, a) for a in argv]
    assert main(["generate", *argv, "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err and "loaded" not in err


def test_lcm_steps_past_its_distillation_schedule_is_one_line(capsys):
    assert main(["generate", "--scheduler", "lcm", "--steps", "60", "--no-progress"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]  # (stderr also has transformers' load bars)
    assert len(errors) == 1 and "Traceback" not in err
    assert "num_inference_steps must be in [1, 50] (original_inference_steps" in errors[0]


def test_error_inside_command_is_one_line(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text("{}")
    assert main(["generate", "--model", str(tmp_path), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks the pipeline components" in err[0]


@pytest.mark.cli_on_gpu  # (check on the GPU in fp16: its rules hold there too)
def test_check_passes_on_default_model(capsys):
    assert main(["check", "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "FAIL" not in text and "0 failed" in text and "group_norm_silu (channels_last)" in text
    assert "stages vs fp32 reference: UNet noise prediction rel err" in text  # where a difference would come from


@pytest.mark.cli_on_gpu  # (check on the GPU in fp16: its rules hold there too)
def test_check_reports_the_plain_pytorch_baseline_in_half_precision(capsys):
    assert main(["check", "--steps", "1", "--dtype", "fp16"]) == 0
    text = capsys.readouterr().out
    assert "plain PyTorch in float16 (reference path) for comparison" in text and "0 failed" in text


@pytest.mark.cli_on_gpu  # (check on the GPU in fp16: its rules hold there too)
def test_check_compares_dtypes_from_one_noise(monkeypatch, capsys):
    """In torch 2.11 (the GPU image's version) a float16 randn is not the float32 one rounded. Simulate that: the
    pipeline's own draw depends on the dtype. check must still compare the float16 image with the float32 one from the
    same starting noise (it gave 13 dB for every implementation when it relied on the generator)."""
    import diffusion_fast.pipeline as pipeline_module

    real = pipeline_module.randn_tensor

    def dtype_dependent(shape, generator=None, device=None, dtype=None):
        noise = real(shape, generator=generator, device=device, dtype=torch.float32)
        return (noise.flip(-1) if dtype == torch.float16 else noise).to(dtype)

    monkeypatch.setattr(pipeline_module, "randn_tensor", dtype_dependent)
    assert main(["check", "--steps", "1", "--dtype", "fp16"]) == 0, capsys.readouterr().out
    assert "0 failed" in capsys.readouterr().out


def test_check_fails_when_fast_path_is_wrong(monkeypatch, capsys):
    import diffusion_fast.ops as ops

    real = ops.group_norm_silu

    def broken(x, *a, **k):  # a fast path that is off by a little must be caught
        out = real(x, *a, **k)
        return out + 1e-2 if k.get("backend", "auto") == "auto" else out

    monkeypatch.setattr(ops, "group_norm_silu", broken)
    assert main(["check", "--steps", "1"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bench_writes_csv_and_plot(tmp_path, capsys):
    csv_path, png, jsonl = tmp_path / "b.csv", tmp_path / "b.png", tmp_path / "r.jsonl"
    assert main(["bench", "--repeats", "1", "--steps", "1", "--csv", str(csv_path), "--plot", str(png),
                 "--jsonl", str(jsonl)]) == 0
    record = json.loads(jsonl.read_text().splitlines()[-1])
    assert record["torch"] == torch.__version__ and record["device"] and len(record["rows"]) > 10
    rows = list(csv.DictReader(open(csv_path)))
    impls = {r["impl"] for r in rows}
    assert {"fast", "reference", "pytorch eager", "diffusion_fast pipeline (fast, NCHW)", "diffusers eager",
            "diffusion_fast pipeline (fast, channels_last, the auto choice)",
            "diffusers + accelerate"} <= impls
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert Image.open(png).size[0] > 0


def test_console_script_is_installed():
    exe = shutil.which("diffusion-fast")
    cmd = [exe] if exe else [sys.executable, "-m", "diffusion_fast.cli"]
    proc = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "generate" in proc.stdout and "check" in proc.stdout


def test_python_dash_m_runs_the_command():
    """``python -m diffusion_fast``, for an environment whose console scripts are not on PATH: the same parser, the
    same exit codes (2 for a bad argument, naming it)."""
    run = lambda *argv: subprocess.run([sys.executable, "-m", "diffusion_fast", *argv], capture_output=True,  # noqa
                                       text=True, timeout=120)
    ok = run("--help")
    assert ok.returncode == 0 and ok.stdout.startswith("usage: diffusion-fast") and "check" in ok.stdout
    bad = run("check", "--dtype", "fp8")
    assert bad.returncode == 2 and "--dtype" in bad.stderr


def _kohya_lora(path, folder, seed):
    """A small kohya LoRA on the tiny UNet's attention projections."""
    from safetensors.torch import save_file

    from diffusion_fast.models.loading import read_state_dict

    generator, state = torch.Generator().manual_seed(seed), {}
    for name, weight in read_state_dict(folder, "unet").items():
        if re.search(r"attn[12]\.to_[qv]\.weight$", name):
            key = "lora_unet_" + name.removesuffix(".weight").replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(2, weight.shape[1], generator=generator) / 4
            state[f"{key}.lora_up.weight"] = torch.randn(weight.shape[0], 2, generator=generator)
    save_file(state, path)
    return str(path)


def test_generate_with_loras(tmp_path, capsys):
    """--lora PATH[:SCALE], repeated: every LoRA active at its scale (the image the API gives with set_adapters)."""
    import numpy as np

    from diffusion_fast import StableDiffusionPipeline, tiny

    folder = tiny.write_tiny_pipeline(str(tmp_path / "model"), "sd1", seed=0)
    a, b = _kohya_lora(tmp_path / "a.safetensors", folder, 1), _kohya_lora(tmp_path / "b.safetensors", folder, 2)
    common = ["generate", "--model", folder, "--steps", "2", "--no-progress", "--device", "cpu"]
    assert main([*common, "--output", str(tmp_path / "plain.png")]) == 0
    assert main([*common, "--lora", f"{a}:0.5", "--lora", b, "--output", str(tmp_path / "lora.png")]) == 0
    assert f"merged 2 LoRAs: {a} at 0.5, {b} at 1" in capsys.readouterr().out
    plain, with_loras = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("plain", "lora"))
    assert np.abs(plain - with_loras).max() > 10
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(a, adapter_name="a")
    pipe.load_lora_weights(b, adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.5, 1.0])
    image = pipe("a photograph of an astronaut riding a horse", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs((image * 255).round() - with_loras).max() <= 1


@pytest.mark.parametrize("lora, message", [
    ("/no/such/lora.safetensors", "no such LoRA file or folder: '/no/such/lora.safetensors'"),
    ("{a}:nan", "the LoRA scale must be a finite number"),
])
def test_generate_bad_lora_argument_one_line(tmp_path, capsys, lora, message):
    (tmp_path / "a.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--lora", lora.format(a=tmp_path / "a.safetensors")])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_generate_lora_that_does_not_fit_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"lora_unet_nowhere.lora_down.weight": torch.ones(2, 3),
               "lora_unet_nowhere.lora_up.weight": torch.ones(3, 2)}, tmp_path / "x.safetensors")
    assert main(["generate", "--steps", "1", "--no-progress", "--lora", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err  # (after the tiny model's progress bars)
    assert "diffusion-fast generate: error: lora: keys matching no module" in err and "Traceback" not in err


def _image_and_mask_files(folder, size, box):
    """in.png (random pixels, ``size`` = (height, width)) and mask.png (white in ``box`` = (y0, y1, x0, x1)) in
    ``folder``; returns (pixels, mask) as arrays."""
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)
    mask = np.zeros(size, dtype=np.uint8)
    mask[box[0]:box[1], box[2]:box[3]] = 255
    Image.fromarray(pixels).save(folder / "in.png")
    Image.fromarray(mask).save(folder / "mask.png")
    return pixels, mask


def test_generate_inpainting(tmp_path, capsys):
    """--image with --mask: inpainting (the built-in model's plain UNet here), the image's size cut to a multiple of 8,
    strength 1 by default."""
    _image_and_mask_files(tmp_path, (40, 44), (8, 24, 8, 24))
    out = tmp_path / "out.png"
    assert main(["generate", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--steps", "3",
                 "--output", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "fast path:      3 steps" in text and "max abs pixel difference" in text
    assert Image.open(out).size == (40, 40)


def test_generate_inpainting_with_padding_mask_crop(tmp_path, capsys):
    """--padding-mask-crop: the box around the mask inpainted at the model's size and pasted back: the output has the
    image's own size (not cut to a multiple of 8) and the image's pixels outside the mask."""
    import numpy as np

    pixels, mask = _image_and_mask_files(tmp_path, (42, 45), (8, 24, 8, 20))
    out = tmp_path / "out.png"
    assert main(["generate", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--steps", "2",
                 "--padding-mask-crop", "4", "--output", str(out), "--no-progress"]) == 0
    assert "max abs pixel difference" in capsys.readouterr().out
    result = np.asarray(Image.open(out))
    assert result.shape == (42, 45, 3) and np.array_equal(result[mask == 0], pixels[mask == 0])
    assert not np.array_equal(result[mask > 0], pixels[mask > 0])
    with pytest.raises(SystemExit) as exit_info:  # (argparse's own one line)
        main(["generate", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
              "--padding-mask-crop", "-2"])
    assert exit_info.value.code == 2 and "must be 0 or more, got -2" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--mask", "MASK"], "--mask is for inpainting: give --image too"),
    (["--image", "IMAGE", "--padding-mask-crop", "4"], "--padding-mask-crop is for inpainting: give --image and"),
    (["--image", "IMAGE", "--mask", "/no/such/mask.png"], "--mask: no such file: /no/such/mask.png"),
    (["--image", "IMAGE", "--mask", "SMALL"], "--mask is 8x8 and --image 16x16: give them the same size"),
])
def test_generate_inpainting_bad_options_one_line(tmp_path, capsys, argv, message):
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    Image.new("L", (16, 16)).save(tmp_path / "mask.png")
    Image.new("L", (8, 8)).save(tmp_path / "small.png")
    names = {"IMAGE": tmp_path / "in.png", "MASK": tmp_path / "mask.png", "SMALL": tmp_path / "small.png"}
    assert main(["generate", *[str(names.get(a, a)) for a in argv], "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_generate_inpainting_model_needs_a_mask(tmp_path, capsys):
    from diffusers import StableDiffusionInpaintPipeline as Theirs

    import _tiny_diffusers

    Theirs(**_tiny_diffusers.pipeline("sd1", 0).components).save_pretrained(tmp_path / "inpaint")
    assert main(["generate", "--model", str(tmp_path / "inpaint"), "--steps", "1", "--no-progress"]) == 2
    assert "is an inpainting model: give --image and --mask" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sdxl_folders(tmp_path_factory):
    """(an SDXL base folder, a refiner folder), tiny, and diffusers' pair on them."""
    import diffusers

    import _tiny_diffusers

    root = tmp_path_factory.mktemp("cli-sdxl")
    base = _tiny_diffusers.sdxl_pipeline(seed=1)
    base.save_pretrained(root / "base")
    refiner = _tiny_diffusers.sdxl_refiner_pipeline(base, seed=2)
    refiner.save_pretrained(root / "refiner")
    refiner.scheduler = diffusers.DDIMScheduler.from_config(refiner.scheduler.config)  # its own, as loaded
    return root / "base", root / "refiner", base, refiner


def _levels_from_ensemble(png, base, refiner, prompt, start):
    """The most 8-bit levels the CLI's PNG is from diffusers' base + refiner pair (6 steps, the refiner from
    ``start``, 32x32; one generator for both, seeded 0 on the CPU as the CLI's)."""
    import numpy as np

    kwargs = dict(prompt=prompt, num_inference_steps=6, generator=torch.Generator().manual_seed(0))
    latents = base(**kwargs, height=32, width=32, denoising_end=start, output_type="latent").images
    expected = refiner(**kwargs, image=latents, denoising_start=start, output_type="np").images[0]
    ours = np.asarray(Image.open(png)).astype(np.int16)
    return np.abs(ours - (expected * 255).round().astype(np.int16)).max()


def test_generate_sdxl_base_and_refiner(sdxl_folders, tmp_path, capsys):
    """The CLI's --refiner runs diffusers' ensemble of expert denoisers: the same PNG as diffusers' pair (seed 0, the
    CLI's generator on the CPU), within one 8-bit level; the base's 0.7 of 6 DDIM steps, the refiner's rest."""
    base_folder, refiner_folder, base, refiner = sdxl_folders
    out = tmp_path / "out.png"
    assert main(["generate", "--model", str(base_folder), "--refiner", str(refiner_folder), "--refiner-start", "0.7",
                 "--steps", "6", "--height", "32", "--width", "32", "--output", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "refiner" in text and "takes over at 0.7" in text and "fast path:      6 steps" in text
    assert _levels_from_ensemble(out, base, refiner, "a photograph of an astronaut riding a horse", 0.7) <= 1


def test_generate_refiner_gets_sdxl_embeddings(sdxl_folders, tmp_path, capsys):
    """--embedding with --refiner: an SDXL embedding (clip_l, clip_g) goes into the base's two encoders and the
    refiner's one (clip_g), as a diffusers user loads it, with one call per encoder; the same PNG as diffusers' pair.
    An embedding for one encoder stays the base's, said in one line. The refiner takes over at 0.3, so that its
    part moves the image."""
    import diffusers
    from safetensors.torch import save_file

    base_folder, refiner_folder, _, _ = sdxl_folders
    g = torch.Generator().manual_seed(7)
    state = {"clip_l": torch.randn(2, 16, generator=g), "clip_g": torch.randn(2, 24, generator=g)}
    save_file(state, tmp_path / "xl.safetensors")
    save_file({"<plain>": torch.randn(1, 16, generator=g)}, tmp_path / "plain.safetensors")
    out = tmp_path / "out.png"
    argv = ["generate", "--model", str(base_folder), "--refiner", str(refiner_folder), "--refiner-start", "0.3",
            "--steps", "6", "--height", "32", "--width", "32", "--prompt", "a <xl-style> horse", "--no-progress",
            "--embedding", f"{tmp_path / 'xl.safetensors'}:<xl-style>", "--output", str(out)]
    assert main(argv + ["--embedding", str(tmp_path / "plain.safetensors")]) == 0
    assert "plain.safetensors: the base's first text encoder only" in capsys.readouterr().out
    base = diffusers.DiffusionPipeline.from_pretrained(base_folder)
    refiner = diffusers.DiffusionPipeline.from_pretrained(refiner_folder)
    for pipe, key, encoder, tokenizer in [(base, "clip_l", "text_encoder", "tokenizer"),
                                          (base, "clip_g", "text_encoder_2", "tokenizer_2"),
                                          (refiner, "clip_g", "text_encoder_2", "tokenizer_2")]:
        pipe.load_textual_inversion(state[key], token="<xl-style>", text_encoder=getattr(pipe, encoder),
                                    tokenizer=getattr(pipe, tokenizer))
    base.load_textual_inversion(str(tmp_path / "plain.safetensors"))
    assert _levels_from_ensemble(out, base, refiner, "a <xl-style> horse", 0.3) <= 1
    # the refiner's embedding matters: diffusers' refiner without it gives another image
    plain_refiner = diffusers.DiffusionPipeline.from_pretrained(refiner_folder)
    assert _levels_from_ensemble(out, base, plain_refiner, "a <xl-style> horse", 0.3) > 3  # (9 levels, measured)


@pytest.mark.parametrize("argv, message", [
    (["--refiner-start", "0.5"], "--refiner-start is for an SDXL base \\+ refiner: give --refiner too"),
    (["--refiner", "REFINER"], "--refiner: the refiner takes over an SDXL base's text-to-image run"),  # an SD model
    (["--model", "BASE", "--refiner", "REFINER", "--refiner-start", "1.5"], "--refiner-start must be a fraction"),
    (["--model", "REFINER"], "is an SDXL refiner: give --image to refine, or use it as --refiner"),
])
def test_generate_refiner_bad_options_one_line(sdxl_folders, capsys, argv, message):
    names = {"BASE": str(sdxl_folders[0]), "REFINER": str(sdxl_folders[1])}
    assert main(["generate", *[names.get(a, a) for a in argv], "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


def test_generate_sdxl_inpainting(sdxl_folders, tmp_path, capsys):
    """--image with --mask on an SDXL folder inpaints with our SDXL inpainting pipeline: diffusers' PNG for the same
    seed (within one 8-bit level), at its default strength 0.9999 (3 of 4 steps run)."""
    import diffusers
    import numpy as np

    base_folder, _, base, _ = sdxl_folders
    rng = np.random.default_rng(4)
    image, mask = Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)), np.zeros((32, 40), np.uint8)
    mask[8:24, 8:32] = 255
    paths = {name: tmp_path / f"{name}.png" for name in ("image", "mask", "out")}
    image.save(paths["image"])
    Image.fromarray(mask).save(paths["mask"])
    assert main(["generate", "--model", str(base_folder), "--image", str(paths["image"]), "--mask",
                 str(paths["mask"]), "--steps", "4", "--output", str(paths["out"]), "--no-progress"]) == 0
    assert "fast path:      3 steps" in capsys.readouterr().out
    components = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    theirs = diffusers.StableDiffusionXLInpaintPipeline(**components)
    theirs.set_progress_bar_config(disable=True)
    expected = theirs("a photograph of an astronaut riding a horse", image=image, mask_image=Image.fromarray(mask),
                      height=32, width=40, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                      output_type="np").images[0]
    ours = np.asarray(Image.open(paths["out"])).astype(np.int16)
    assert np.abs(ours - (expected * 255).round().astype(np.int16)).max() <= 1


def test_generate_clip_skip(tmp_path, capsys):
    """--clip-skip reaches the pipeline (another image), and a value the text encoder cannot skip is one line."""
    import numpy as np

    outs = [tmp_path / "a.png", tmp_path / "b.png"]
    for out, extra in zip(outs, ([], ["--clip-skip", "1"])):
        assert main(["generate", "--steps", "2", "--output", str(out), "--no-progress", *extra]) == 0
    a, b = (np.asarray(Image.open(p)).astype(np.int16) for p in outs)
    assert np.abs(a - b).max() > 2
    capsys.readouterr()
    assert main(["generate", "--steps", "2", "--clip-skip", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "clip_skip must be None or an int in [0, 2)" in err and "Traceback" not in err


def test_generate_with_an_embedding(tmp_path, capsys):
    """--embedding PATH:TOKEN loads a textual inversion file into the model's text encoder: the prompt's token then
    changes the image; a missing file is one line."""
    import numpy as np
    from safetensors.torch import save_file

    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
              tmp_path / "style.safetensors")
    outs = [tmp_path / "a.png", tmp_path / "b.png"]
    for out, extra in zip(outs, ([], ["--embedding", f"{tmp_path / 'style.safetensors'}:<style>"])):
        assert main(["generate", "--steps", "2", "--prompt", "a cube in <style>", "--output", str(out),
                     "--no-progress", *extra]) == 0
    assert "loaded 1 textual inversion embedding" in capsys.readouterr().out
    a, b = (np.asarray(Image.open(p)).astype(np.int16) for p in outs)
    assert np.abs(a - b).max() > 2
    with pytest.raises(SystemExit):
        main(["generate", "--embedding", str(tmp_path / "missing.pt")])
    assert "no such textual inversion file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_check_runs_a_refiner_as_image_to_image(sdxl_folders, capsys, monkeypatch, dtype):
    """An SDXL refiner folder (image-to-image only) is checked on an image made from the seed; in fp16 against the
    fp32 run from the same noise, though the pipeline draws it itself (float32_draws). torch 2.11's float16 randn,
    which is not the float32 one rounded, is simulated, as in test_check_compares_dtypes_from_one_noise."""
    real = torch.randn

    def dtype_dependent(*args, dtype=None, **kwargs):
        noise = real(*args, dtype=torch.float32 if dtype == torch.float16 else dtype, **kwargs)
        return noise.flip(-1).to(dtype) if dtype == torch.float16 else noise

    monkeypatch.setattr(torch, "randn", dtype_dependent)
    assert main(["check", "--model", str(sdxl_folders[1]), "--steps", "2", "--dtype", dtype]) == 0
    text = capsys.readouterr().out
    assert "image-to-image pipeline (2 DDIM steps" in text and "0 failed" in text


@pytest.mark.parametrize("in_channels", [9, 4])
def test_check_runs_an_inpainting_folder(tmp_path, capsys, monkeypatch, in_channels):
    """An inpainting folder (a 9-channel inpainting UNet, or a plain one) is checked on an image and mask made from
    the seed; a fast path that is off fails it, as for text-to-image."""
    import _tiny_diffusers
    from diffusers import StableDiffusionInpaintPipeline as Theirs
    from diffusers import UNet2DConditionModel

    from diffusion_fast import tiny

    torch.manual_seed(1)
    unet = UNet2DConditionModel(**dict(tiny.unet_config("sd1"), in_channels=in_channels))
    Theirs(**dict(_tiny_diffusers.pipeline("sd1", 0).components, unet=unet)).save_pretrained(tmp_path / "inpaint")
    assert main(["check", "--model", str(tmp_path / "inpaint"), "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "inpainting pipeline (2 " in text and "0 failed" in text
    import diffusion_fast.ops as ops

    real = ops.group_norm_silu
    monkeypatch.setattr(ops, "group_norm_silu", lambda x, *a, **k: real(x, *a, **k) + (
        1e-2 if k.get("backend", "auto") == "auto" else 0.0))
    assert main(["check", "--model", str(tmp_path / "inpaint"), "--steps", "1"]) == 1


@pytest.fixture(scope="module")
def controlnet_folders(tmp_path_factory):
    """A tiny SD1 folder, two ControlNet folders for it, a ControlNet pipeline folder (diffusers saved it with its
    first net), an SDXL folder and a net for it, two conditioning images, and diffusers' pipelines: SD with both
    nets, SD with the first (the one saved with it), SDXL with its net."""
    import diffusers
    import numpy as np

    import _tiny_diffusers

    root = tmp_path_factory.mktemp("cli-controlnet")
    theirs = _tiny_diffusers.controlnet_pipeline(seed=4, nets=2)
    _tiny_diffusers.pipeline("sd1", seed=4).save_pretrained(root / "sd")
    for i, net in enumerate(theirs.controlnet.nets):
        net.save_pretrained(root / f"net{i}")
    with_net = _tiny_diffusers.controlnet_pipeline(seed=4, nets=1)
    with_net.save_pretrained(root / "sd-controlnet")
    xl = _tiny_diffusers.controlnet_pipeline(seed=4, nets=1, variant="sdxl")
    xl.controlnet.save_pretrained(root / "xl-net")
    diffusers.StableDiffusionXLPipeline(**{k: v for k, v in xl.components.items() if k != "controlnet"}).save_pretrained(
        root / "sdxl")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (34, 42), dtype=np.uint8)).save(root / "edges.png")  # grayscale, 42x34
    Image.fromarray(rng.integers(0, 255, (34, 42, 3), dtype=np.uint8)).save(root / "pose.png")
    Image.fromarray(rng.integers(0, 255, (34, 42, 3), dtype=np.uint8)).save(root / "init.png")  # (image-to-image's)
    mask = np.zeros((34, 42), np.uint8)
    mask[8:24, 10:30] = 255
    Image.fromarray(mask).save(root / "mask.png")
    return root, theirs, with_net, xl


@pytest.mark.parametrize("nets", [1, 2, "sdxl", "img2img", "inpaint", "sdxl-inpaint"])
def test_generate_with_controlnets_gives_diffusers_image(controlnet_folders, tmp_path, capsys, nets):
    """--controlnet DIR --control-image FILE (repeated): the image diffusers' ControlNet pipeline makes from the same
    seed (within one 8-bit level), at the first image's size cut to a multiple of the VAE's scale."""
    import numpy as np

    root, theirs, with_net, xl = controlnet_folders
    out = tmp_path / "out.png"
    argv = ["generate", "--steps", "3", "--seed", "2", "--controlnet-scale", "0.8", "--output", str(out),
            "--no-progress", "--compare"]
    if nets == 1:  # the model folder's own ControlNet
        argv += ["--model", str(root / "sd-controlnet"), "--control-image", str(root / "edges.png")]
        pipe, image = with_net, Image.open(root / "edges.png")
    elif nets == "img2img":  # --image too: the folder's net guides image-to-image (the pipeline's scale 0.8 here)
        import diffusers

        argv = [a for a in argv if a not in ("--controlnet-scale", "0.8")]
        argv += ["--model", str(root / "sd-controlnet"), "--control-image", str(root / "edges.png"), "--image",
                 str(root / "init.png"), "--strength", "0.7"]
        pipe = diffusers.StableDiffusionControlNetImg2ImgPipeline(**with_net.components)
        image = {"image": Image.open(root / "init.png"), "control_image": Image.open(root / "edges.png"),
                 "strength": 0.7}
    elif nets == "inpaint":  # --image and --mask: inpainting guided by the net (the pipeline's scale 0.5 here)
        import diffusers

        argv = [a for a in argv if a not in ("--controlnet-scale", "0.8")]
        argv += ["--model", str(root / "sd"), "--controlnet", str(root / "net0"), "--control-image",
                 str(root / "edges.png"), "--image", str(root / "init.png"), "--mask", str(root / "mask.png")]
        pipe = diffusers.StableDiffusionControlNetInpaintPipeline(**dict(theirs.components,
                                                                          controlnet=theirs.controlnet.nets[0]))
        image = {"image": Image.open(root / "init.png"), "mask_image": Image.open(root / "mask.png"),
                 "control_image": Image.open(root / "edges.png"), "controlnet_conditioning_scale": 0.5}
    elif nets == "sdxl-inpaint":  # SDXL's ControlNet inpainting: its defaults (scale 1, strength 0.9999)
        import diffusers

        argv = [a for a in argv if a not in ("--controlnet-scale", "0.8")]
        argv += ["--model", str(root / "sdxl"), "--controlnet", str(root / "xl-net"), "--control-image",
                 str(root / "edges.png"), "--image", str(root / "init.png"), "--mask", str(root / "mask.png")]
        pipe = diffusers.StableDiffusionXLControlNetInpaintPipeline(**xl.components)
        image = {"image": Image.open(root / "init.png"), "mask_image": Image.open(root / "mask.png"),
                 "control_image": Image.open(root / "edges.png"), "controlnet_conditioning_scale": 1.0}
    elif nets == "sdxl":
        argv += ["--model", str(root / "sdxl"), "--controlnet", str(root / "xl-net"), "--control-image",
                 str(root / "edges.png")]
        pipe, image = xl, Image.open(root / "edges.png")
    else:
        argv += ["--model", str(root / "sd"), "--controlnet", str(root / "net0"), "--control-image",
                 str(root / "edges.png"), "--controlnet", str(root / "net1"), "--control-image", str(root / "pose.png")]
        pipe, image = theirs, [Image.open(root / "edges.png"), Image.open(root / "pose.png")]
    assert main(argv) == 0
    assert "max abs pixel difference" in capsys.readouterr().out
    inputs = image if isinstance(image, dict) else {"image": image}
    inputs.setdefault("controlnet_conditioning_scale", [0.8, 0.8] if nets == 2 else 0.8)
    expected = pipe("a photograph of an astronaut riding a horse", num_inference_steps=3,
                    generator=torch.Generator().manual_seed(2), **inputs).images[0]
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert got.shape == (32, 40, 3) and np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize("argv, message", [
    (["--controlnet", "NET0"], "--controlnet, --controlnet-scale and --control-mode need --control-image"),
    (["--control-image", "EDGES"], "--control-image is for ControlNet: give --controlnet too"),
    (["--controlnet", "NET0", "--controlnet", "NET1", "--control-image", "EDGES"],
     r"--control-image: give one per --controlnet \(2\), in order; got 1"),
    (["--controlnet", "NET0", "--control-image", "/no/such.png"], "--control-image: no such file: /no/such.png"),
    (["--controlnet", "NET0", "--control-image", "EDGES", "--controlnet-scale", "1", "--controlnet-scale", "2"],
     r"--controlnet-scale: give one for all ControlNets or one per ControlNet \(1\); got 2"),
    (["--controlnet", "NET0", "--control-image", "EDGES", "--refiner", "SD"],
     "--controlnet: leave out --refiner"),
    (["--model", "SDXL", "--controlnet", "NET0", "--control-image", "EDGES", "--image", "INIT"],
     "--controlnet: controlnet 0 .* does not fit this UNet"),  # SDXL image-to-image: an SD1 net does not fit
    (["--model", "SD_CONTROLNET"], "is a ControlNet pipeline with 1 ControlNet: give --control-image for each"),
    (["--model", "SD2", "--controlnet", "NET0", "--control-image", "EDGES"],
     "--controlnet: controlnet 0 .* does not fit this UNet"),  # an SD1-shaped net for an SD2-shaped model
    (["--model", "SDXL", "--controlnet", "NET0", "--control-image", "EDGES"],
     "--controlnet: controlnet 0 .* does not fit this UNet"),  # an SD1 net for an SDXL model
])
def test_generate_controlnet_bad_options_one_line(controlnet_folders, tmp_path, capsys, argv, message):
    from diffusion_fast import tiny

    root = controlnet_folders[0]
    if "SD2" in argv:
        tiny.write_tiny_pipeline(str(tmp_path / "sd2"), "sd2", 0)
    names = {"NET0": root / "net0", "NET1": root / "net1", "EDGES": root / "edges.png", "SD2": tmp_path / "sd2",
             "SDXL": root / "sdxl", "INIT": root / "init.png", "SD": root / "sd",
             "SD_CONTROLNET": root / "sd-controlnet"}
    if "--model" not in argv:
        argv = ["--model", str(root / "sd"), *argv]
    assert main(["generate", *[str(names.get(a, a)) for a in argv], "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


def test_check_runs_a_controlnet_folder(controlnet_folders, capsys, monkeypatch):
    """A folder diffusers saved a ControlNet pipeline in is checked on a conditioning image made from the seed (the
    UNet's first prediction with the net's residuals too); a ControlNet fast path that is off fails it."""
    from diffusion_fast import current_backend
    from diffusion_fast.models import controlnet

    import diffusers

    root, xl = controlnet_folders[0], controlnet_folders[3]
    xl.save_pretrained(root / "sdxl-controlnet")  # (an SDXL one too: the probe's added conditioning before the image)
    diffusers.StableDiffusionControlNetImg2ImgPipeline(**controlnet_folders[2].components).save_pretrained(
        root / "sd-controlnet-img2img")  # and image-to-image, from half the schedule, and inpainting
    diffusers.StableDiffusionControlNetInpaintPipeline(**controlnet_folders[2].components).save_pretrained(
        root / "sd-controlnet-inpaint")
    import _tiny_diffusers
    from diffusion_fast import tiny

    torch.manual_seed(1)  # inpainting UNets (9 input channels; the nets take the 4 latent ones), SD's and SDXL's
    diffusers.StableDiffusionControlNetInpaintPipeline(**dict(controlnet_folders[2].components, unet=diffusers
        .UNet2DConditionModel(**dict(tiny.unet_config("sd1"), in_channels=9)))).save_pretrained(root / "sd-cn-inpaint9")
    diffusers.StableDiffusionXLControlNetInpaintPipeline(**dict(xl.components, unet=diffusers.UNet2DConditionModel(
        **dict(_tiny_diffusers.SDXL_TINY, in_channels=9)))).save_pretrained(root / "sdxl-cn-inpaint9")
    for folder, kind in (("sdxl-controlnet", "ControlNet"), ("sd-controlnet-img2img", "ControlNet image-to-image"),
                         ("sd-controlnet-inpaint", "ControlNet inpainting"), ("sd-controlnet", "ControlNet"),
                         ("sd-cn-inpaint9", "ControlNet inpainting"), ("sdxl-cn-inpaint9", "ControlNet inpainting")):
        assert main(["check", "--model", str(root / folder), "--steps", "2"]) == 0
        text = capsys.readouterr().out
        assert f"{kind} pipeline (2 " in text and "0 failed" in text
    real = controlnet.ControlNetConditioningEmbedding.forward
    monkeypatch.setattr(controlnet.ControlNetConditioningEmbedding, "forward", lambda self, image: real(self, image) + (
        0.05 if current_backend() != "reference" else 0.0))
    assert main(["check", "--model", str(root / "sd-controlnet"), "--steps", "2"]) == 1
    assert "ControlNet pipeline (2 " in capsys.readouterr().out
