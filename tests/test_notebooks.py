"""The four notebooks, executed with papermill on the embedded default, in a chain through their files."""

from __future__ import annotations

import json

import pytest
import torch

from sdnb.demo import demo_parameters, run_notebook


NEEDS = {"01_captioning": (), "02_vae_finetune": (), "03_sd_finetune": ("01_captioning",),
         "04_compare": ("02_vae_finetune", "03_sd_finetune")}


class Chain:
    """The notebooks as `make demo` runs them (shorter training), each run once, on first need, after what it reads."""

    def __init__(self, assets, out, single_file=None):
        self.out, self.params, self.done = out, demo_parameters(assets, out, scale=0.7), set()
        # 02 on 32 px patches: 4x cheaper per step than the demo's 64 px; 16 held-out patches (no rFID)
        self.params["02_vae_finetune"].update(patch_size=32, max_steps=80, n_val_patches=16, tile_size=128)
        if single_file:  # the base model as one .safetensors file (configuration from its folder), TensorBoard on
            self.params["02_vae_finetune"].update(model_id=str(single_file), model_config=str(assets.sd),
                                                  log_with="tensorboard")

    def run(self, name: str):
        for need in NEEDS[name]:
            self.run(need)
        if name not in self.done:
            self.done.add(name)
            run_notebook(name, self.out, self.params[name])
        return self.out, self.params


@pytest.fixture(scope="session")
def chain_runner(tiny_assets, tmp_path_factory, tiny_single_file):
    return Chain(tiny_assets, tmp_path_factory.mktemp("chain"), tiny_single_file)


@pytest.fixture()
def vae_run(chain_runner):
    return chain_runner.run("02_vae_finetune")


def test_02_fine_tuning_improves_held_out_reconstructions(vae_run):
    out, params = vae_run
    run = out / "02_vae_finetune"
    metrics = json.loads((run / "metrics.json").read_text())["vae"]
    base, tuned = ({k: v["value"] for k, v in metrics["models"][name].items()} for name in ("base", "finetuned"))
    assert metrics["n_images"] == 16
    assert tuned["psnr"] > base["psnr"] + 2.0, metrics  # dB, on held-out patches of held-out images
    assert tuned["lpips"] < base["lpips"], metrics
    assert tuned["ssim"] > base["ssim"], metrics
    assert metrics["wins"]["finetuned vs base"]["psnr"]["value"] > 0.5  # better on most patches, not on average only
    control = json.loads((run / "control" / "config.json").read_text())  # the demo trains a control on the photos
    assert control["is_control"] and control["max_steps"] == params["02_vae_finetune"]["max_steps"]
    assert (run / "control" / "final").is_dir() and "finetuned vs control" in metrics["difference"]
    assert "Finetuned vs control (PSNR" in metrics["verdict"]
    for grid in ("base_reconstructions", "heldout_patches", "heldout_full", "loss"):
        assert (run / "grids" / f"{grid}.png").stat().st_size > 5_000


def test_02_final_vae_loads_and_drops_into_the_pipeline(vae_run, tiny_assets):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    out, _ = vae_run
    vae = AutoencoderKL.from_pretrained(out / "02_vae_finetune" / "final")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_assets.sd, vae=vae, safety_checker=None)
    image = pipe("a photo", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and (image == image).all()


def test_02_from_a_single_file_exports_one_file_and_logs_to_tensorboard(vae_run, tiny_assets):
    from diffusers import AutoencoderKL

    from sdnb.models import load_vae
    from tests.helpers import tensorboard_events

    out, params = vae_run
    run = out / "02_vae_finetune"
    assert params["02_vae_finetune"]["model_id"].endswith(".safetensors")
    tuned = AutoencoderKL.from_pretrained(run / "final")
    exported = load_vae(str(run / "export" / "02_vae_finetune.vae.safetensors"), config=str(tiny_assets.sd))
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in tuned.state_dict().items())
    scalars, images = tensorboard_events(run / "sdnb")
    steps = [s for s, _ in scalars["val_psnr"]]
    assert steps[-1] == params["02_vae_finetune"]["max_steps"] and len(scalars["loss"]) >= 4
    assert [s for s, *_ in images["heldout_reconstructions"]] == steps


def test_02_loss_falls(vae_run):
    import csv

    out, _ = vae_run
    rows = [r for r in csv.DictReader(open(out / "02_vae_finetune" / "log.csv")) if r.get("loss")]
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) >= 4
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.7 * first, losses


def test_bad_parameter_fails_in_the_config_cell_naming_it(tiny_assets, tmp_path):
    import nbformat
    from papermill.exceptions import PapermillExecutionError

    params = demo_parameters(tiny_assets, tmp_path)["02_vae_finetune"]
    with pytest.raises(PapermillExecutionError) as err:
        run_notebook("02_vae_finetune", tmp_path, dict(params, patch_size=-3))
    assert "patch_size=-3" in str(err.value)
    executed = nbformat.read(str(tmp_path / "notebooks" / "02_vae_finetune.ipynb"), as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    failed = [i for i, c in enumerate(code) if any(o.get("output_type") == "error" for o in c.outputs)]
    config_cell = [i for i, c in enumerate(code) if "from_namespace" in c.source]
    assert failed == config_cell  # it failed early, before any data or model was loaded
    assert not (tmp_path / "02_vae_finetune" / "checkpoints").exists()


def test_02_stopped_and_resumed_from_the_drive_mirror_equals_an_uninterrupted_run(tiny_assets, tmp_path):
    """20 steps straight vs 10 steps, a lost runtime (local checkpoints gone), then resume="latest" to 20; the
    control run (run_dir/control, mirrored to sync_dir/control) too."""
    import csv
    import shutil

    from safetensors.torch import load_file

    def params(run, **kw):
        base = demo_parameters(tiny_assets, tmp_path)["02_vae_finetune"]
        return dict(base, run_dir=str(tmp_path / run), patch_size=32, patches_per_epoch=40, n_val_patches=4,
                    batch_size=2, log_every=1, validate_every=0, checkpoint_every=10, **kw)

    run_notebook("02_vae_finetune", tmp_path / "a", params("straight", max_steps=20))
    run_notebook("02_vae_finetune", tmp_path / "b", params("resumed", max_steps=10, sync_dir=str(tmp_path / "drive")))
    for lost in ("checkpoints", "control/checkpoints"):  # the runtime was reset: only the mirror is left
        shutil.rmtree(tmp_path / "resumed" / lost)
    run_notebook("02_vae_finetune", tmp_path / "b", params("resumed", max_steps=20, sync_dir=str(tmp_path / "drive"),
                                                           resume="latest"))
    for final in ("final", "control/final"):
        weights = [load_file(tmp_path / run / final / "diffusion_pytorch_model.safetensors") for run in ("straight", "resumed")]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # bitwise on CPU

    def losses(run):
        return [(r["step"], r["loss"]) for r in csv.DictReader(open(tmp_path / run / "log.csv")) if r.get("loss")]

    assert len(losses("straight")) == 20 and losses("straight") == losses("resumed")
    assert losses("straight/control") == losses("resumed/control") != losses("resumed")  # its own run, resumed too


def test_02_and_04_write_the_same_vae_metrics_schema(vae_run, tiny_assets, tmp_path):
    """04 on 02's run folder (VAE part only): the "vae" section of both metrics.json has the same keys, all the way
    down, because both notebooks call the same comparison verb."""
    out, params = vae_run
    run_notebook("04_compare", tmp_path, dict(
        run_dir=str(tmp_path / "04"), device="cpu", mixed_precision="no", base_vae=str(tiny_assets.sd),
        finetuned_vae=str(out / "02_vae_finetune"), image_dir=str(tiny_assets.fundus_val), patch_size=32, n_patches=16,
        n_full_images=0, finetuned_model="", fid_features="fid-helper", n_bootstrap=50))

    def keys(node, depth=0):
        if not isinstance(node, dict) or depth > 3:
            return None
        return {k: keys(v, depth + 1) for k, v in node.items() if k != "per_image"}

    vae02 = json.loads((out / "02_vae_finetune" / "metrics.json").read_text())["vae"]
    vae04 = json.loads((tmp_path / "04" / "metrics.json").read_text())["vae"]
    assert keys(vae02) == keys(vae04) and list(vae04["models"]) == ["base", "finetuned", "control"]  # 'auto' found it
    same = [v["difference"]["finetuned vs control"]["psnr"]["value"] for v in (vae02, vae04)]
    assert same[0] == pytest.approx(same[1], rel=1e-4) and "control" in vae04["verdict"]  # the same patches, VAEs
    assert vae02["models"]["finetuned"]["psnr"]["n"] == vae04["models"]["finetuned"]["psnr"]["n"] == 16
