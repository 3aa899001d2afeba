"""Pushing to the Hub, offline: HfApi's methods replaced by a recorder of the exact files sent.

The recorder stands in for `HfApi.create_repo` and `HfApi.create_commit` (the only two calls a push
makes); any other Hub call would meet HF_HUB_OFFLINE=1 and fail the test. Cards are read back with
huggingface_hub's own parser, and a pushed model is read back from a cache laid out as the Hub
client lays one out.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx2
import numpy as np
import pytest
import torch
from hub_cache import add_to_hub_cache
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from PIL import Image
from reference import RefPaired
from safetensors.torch import save_file
from training_assets import (
    flat,
    make_domains_dataset,
    make_shapes_dataset,
    make_tiny_clip,
    make_tiny_dino,
    one_thread,  # noqa: F401 (autouse fixture)
)

from training.config import CommonConfig, ConfigError
from training.hub_push import STAGING, HubPush
from training.paired import main as paired_main
from training.unpaired import UnpairedConfig
from training.unpaired import train as train_unpaired
from turbo.cli import main as cli_main
from turbo.formats import load_checkpoint, save_checkpoint
from turbo.model_card import build_model_card, figures_from_metrics, is_hub_id
from turbo.model_source import model_file
from turbo.pipeline import Pipeline
from turbo.push import PushError, check_repo_id

SHA = "0123456789abcdef0123456789abcdef01234567"
HUB_LOG = "training.hub_push"


class Recorder:
    """What a push sent: created repos and commits (message and each file's name and bytes).

    `fail`: exceptions the next commits raise, one per commit, in order (None: that one succeeds);
    `gate`: an Event the first commit waits for, to hold an upload in flight."""

    def __init__(self, monkeypatch, fail=(), gate: threading.Event | None = None):
        self.repos: list[dict] = []
        self.commits: list[dict] = []  # every attempt; "error" says which failed
        self.fail = list(fail)
        self.gate = gate
        self.started = threading.Event()
        recorder = self

        def create_repo(api, repo_id, **kwargs):
            recorder.repos.append({"repo_id": repo_id, **kwargs})
            return f"https://huggingface.co/{repo_id}"

        def create_commit(api, repo_id, operations, **kwargs):
            recorder.started.set()
            if recorder.gate is not None and not recorder.commits:
                assert recorder.gate.wait(30)
            files = {}
            for op in operations:
                source = op.path_or_fileobj
                files[op.path_in_repo] = (
                    Path(source).read_bytes() if isinstance(source, str) else bytes(source)
                )
            error = recorder.fail.pop(0) if recorder.fail else None
            recorder.commits.append({"repo_id": repo_id, "files": files, "error": error, **kwargs})
            if error is not None:
                raise error
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{SHA}")

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)

    @property
    def sent(self) -> list[dict]:
        return [c for c in self.commits if c["error"] is None]


@pytest.fixture(autouse=True)
def token(monkeypatch, tmp_path):
    """A token from the environment, none on disk (the real login of whoever runs the tests is unused)."""
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))


@pytest.fixture(scope="module")
def models(tiny_base_dir, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("push_models")
    RefPaired(str(tiny_base_dir), seed=1).save_pkl(folder / "paired.pkl")
    ckpt = load_checkpoint(folder / "paired.pkl")
    ckpt.prompts["a2b"] = "a photo of a cat"
    ckpt.preprocess = "canny"
    save_checkpoint(ckpt, folder / "paired.safetensors")
    save_file({"w": torch.zeros(2)}, folder / "plain.safetensors", metadata={"format": "pt"})
    (folder / "notes.txt").write_text("not a model")
    return folder


def http_error(status: int) -> HfHubHTTPError:
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    response = httpx2.Response(status, request=request)
    return HfHubHTTPError(f"{status} Client Error for url: {request.url}", response=response)


def card_data(text: bytes) -> dict:
    return ModelCard(text.decode()).data.to_dict()


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = cli_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# -- python -m turbo push ------------------------------------------------------------------------


def test_push_sends_the_model_file_as_is_and_a_card_the_hub_parser_reads(models, monkeypatch, capsys):
    rec = Recorder(monkeypatch)
    code, out, err = run_cli(
        ["push", str(models / "paired.safetensors"), "me/cat-edges", "--private", "--message", "first",
         "--dataset", "me/cats", "--license", "mit"],
        capsys,
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert out.startswith(f"pushed {models / 'paired.safetensors'} to me/cat-edges (https://huggingface.co/")
    assert rec.repos == [{"repo_id": "me/cat-edges", "repo_type": "model", "private": True, "exist_ok": True}]
    [commit] = rec.commits
    assert commit["commit_message"] == "first"
    assert sorted(commit["files"]) == ["README.md", "model.safetensors"]
    assert commit["files"]["model.safetensors"] == (models / "paired.safetensors").read_bytes()
    data = card_data(commit["files"]["README.md"])
    assert data == {
        "base_model": "stabilityai/sd-turbo",
        "base_model_relation": "adapter",
        "datasets": ["me/cats"],
        "library_name": "turbo",
        "license": "mit",
        "pipeline_tag": "image-to-image",
        "tags": ["turbo", "pix2pix-turbo", "lora", "image-to-image"],
    }
    body = ModelCard(commit["files"]["README.md"].decode()).text
    assert "A **pix2pix-turbo** model" in body
    assert "- Default prompt: `a photo of a cat`" in body
    assert "- Input: an image, turned into Canny edges" in body
    assert "- Deterministic: no gamma" in body
    cli_line = (
        "python -m turbo translate --model me/cat-edges --input input.png --output output.png "
        '--prompt "a photo of a cat"'
    )
    assert cli_line in body.splitlines()
    assert "TURBO_MODELS=me/cat-edges python app.py" in body.splitlines()
    assert "## Training" not in body  # a bare file: no figures to show


def test_an_original_pkl_is_pushed_converted_to_our_format(models, monkeypatch, capsys, tmp_path):
    rec = Recorder(monkeypatch)
    code, _, err = run_cli(["push", str(models / "paired.pkl"), "me/original"], capsys)
    assert (code, err) == (0, "")
    [commit] = rec.commits
    assert commit["commit_message"] == "Upload model.safetensors with turbo"
    assert sorted(commit["files"]) == ["README.md", "model.safetensors"]
    pushed = tmp_path / "model.safetensors"
    pushed.write_bytes(commit["files"]["model.safetensors"])
    ours, original = load_checkpoint(pushed), load_checkpoint(models / "paired.pkl")
    assert flat(ours).keys() == flat(original).keys()
    assert all(torch.equal(flat(ours)[k], flat(original)[k]) for k in flat(ours))
    data = card_data(commit["files"]["README.md"])
    assert (data["license"], data["license_name"]) == ("other", "sd-turbo-license")
    assert data["license_link"] == "https://huggingface.co/stabilityai/sd-turbo"


@pytest.mark.parametrize(
    "repo",
    ["", "me", "a/b/c", "me/x--y", "me/x..y", "me/.x", "me/x.git", "me/x y", "/abs/path", "me/" + "x" * 95],
)
def test_a_malformed_repo_id_is_one_line_and_sends_nothing(models, monkeypatch, capsys, repo):
    rec = Recorder(monkeypatch)
    code, out, err = run_cli(["push", str(models / "paired.safetensors"), repo], capsys)
    assert code == 2 and out == ""
    assert err == (
        f"error: repo id {repo!r} is not a Hub repo id: give owner/name (letters, digits, '-', '_' and '.', "
        "no '--' or '..', at most 96 characters), e.g. me/day2night\n"
    )
    assert rec.repos == rec.commits == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dataset", "a/b/c"], "error: --dataset 'a/b/c' is not a Hub dataset id (owner/name)\n"),
        (["--run", "no_such_run"], "error: --run no_such_run: no such training run folder\n"),
    ],
)
def test_bad_push_options_are_one_line_and_send_nothing(models, monkeypatch, capsys, extra, message):
    rec = Recorder(monkeypatch)
    monkeypatch.chdir(models)
    code, _, err = run_cli(["push", "paired.safetensors", "me/x", *extra], capsys)
    assert (code, err) == (2, message)
    assert rec.repos == rec.commits == []


def test_without_a_token_nothing_is_sent(models, monkeypatch, capsys):
    rec = Recorder(monkeypatch)
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = run_cli(["push", str(models / "paired.safetensors"), "me/x"], capsys)
    assert code == 2
    assert err == (
        "error: not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN to a token with "
        "write access\n"
    )
    assert rec.repos == rec.commits == []


def test_no_token_in_a_real_process_is_one_line(models, tmp_path):
    env = {
        "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[1]), "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),  # no saved login there
    }  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "turbo", "push", str(models / "paired.safetensors"), "me/x"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        "error: not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN to a token with "
        "write access\n"
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "plain.safetensors",
            "plain.safetensors: a safetensors file, but not a turbo model (no format=turbo",
        ),
        ("notes.txt", "notes.txt: not a readable safetensors file ("),
        ("missing.safetensors", "no such checkpoint file: "),
    ],
)
def test_a_file_that_is_not_a_turbo_model_is_refused_before_any_request(
    models, monkeypatch, capsys, name, message
):
    rec = Recorder(monkeypatch)
    code, _, err = run_cli(["push", str(models / name), "me/x"], capsys)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert rec.repos == rec.commits == []


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (http_error(401), "the Hub refused the token (401 Unauthorized) for me/x: run `hf auth login` or set "
         "HF_TOKEN to a token with write access"),
        (http_error(403), "no write access to me/x (403 Forbidden): the token may be read-only, or me is "
         "neither you nor an organisation you can write to"),
        (http_error(500), "upload to me/x failed: HfHubHTTPError: 500 Client Error for url: "
         "https://huggingface.co/api/repos/create"),
        (OfflineModeIsEnabled("offline"), "cannot push to me/x: HF_HUB_OFFLINE is set; unset it to reach "
         "the Hub"),
        (ConnectionError("Name or service not known"), "upload to me/x failed: the Hub could not be reached "
         "(ConnectionError: Name or service not known)"),
        (httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"), "upload to me/x failed: the "
         "Hub could not be reached (ConnectError: [Errno -3] Temporary failure in name resolution)"),
    ],
)  # fmt: skip
def test_upload_failures_are_one_line(models, monkeypatch, capsys, error, message):
    Recorder(monkeypatch, fail=[error])
    code, out, err = run_cli(["push", str(models / "paired.safetensors"), "me/x"], capsys)
    assert (code, out, err) == (2, "", f"error: {message}\n")


def test_check_repo_id_and_is_hub_id_follow_huggingface_hub():
    from huggingface_hub.utils import validate_repo_id

    for good in ("me/x", "Me-1/x_y.z", "a/" + "b" * 94):
        validate_repo_id(good)
        assert check_repo_id(good) == good and is_hub_id(good)
    with pytest.raises(PushError, match="^--push-to-hub 'x' is not a Hub repo id"):
        check_repo_id("x", "--push-to-hub")


def test_a_stochastic_models_card_gives_gamma_and_lines_a_shell_runs_as_written(models):
    ckpt = load_checkpoint(models / "paired.safetensors")
    ckpt.stochastic, ckpt.preprocess, ckpt.base_model = True, "sketch", "/my models/sd-turbo"
    ckpt.prompts["a2b"] = 'a "quoted" $HOME'
    text = build_model_card(ckpt, "me/sketch")
    data = ModelCard(text).data.to_dict()
    assert data["tags"][-1] == "stochastic" and "base_model" not in data and "license_name" not in data
    lines = ModelCard(text).text.splitlines()
    assert "- Input: a sketch: dark strokes on a light background" in lines
    [gamma] = [line for line in lines if line.startswith("- Stochastic: gamma in [0, 1]")]
    assert gamma.endswith("for varied outputs; default 0.4")
    cli = [line for line in lines if line.startswith("python -m turbo translate")]
    assert cli == [
        "python -m turbo translate --model me/sketch --input input.png --output output.png "
        "--prompt 'a \"quoted\" $HOME' --gamma 0.4 --base '/my models/sd-turbo'"
    ]
    assert shlex.split(cli[0])[10:] == ["--prompt", 'a "quoted" $HOME', "--gamma", "0.4", "--base",
                                        "/my models/sd-turbo"]  # fmt: skip
    assert "TURBO_MODELS=me/sketch python app.py --base '/my models/sd-turbo'" in lines


def test_figures_come_from_the_last_logged_lines():
    lines = [
        json.dumps({"step": 1, "train/lossG": 2.0, "train/lr": 1e-3}),
        json.dumps({"step": 2, "val/fid_a2b": 50.0, "val/dino_struct_a2b": 0.1}),
        '{"step": 3, "train/l',  # a run killed mid-write
        json.dumps({"step": 3, "train/lossG": 1.5, "train/lossD": None}),
    ]
    f = figures_from_metrics(lines, max_steps=10)
    assert (f.step, f.max_steps, f.losses, f.losses_step) == (3, 10, {"lossG": 1.5}, 3)
    assert (f.metrics, f.metrics_step) == ({"fid_a2b": 50.0, "dino_struct_a2b": 0.1}, 2)
    f = figures_from_metrics(lines, up_to=2)  # a checkpoint's: nothing logged after it
    assert (f.step, f.losses, f.losses_step, f.metrics_step) == (2, {"lossG": 2.0}, 1, 2)
    assert figures_from_metrics([]) is None


# -- the trainers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tiny_base_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("push_assets")
    return {
        "base": tiny_base_dir,
        "clip": make_tiny_clip(root / "clip"),
        "data": make_shapes_dataset(root / "shapes", n_train=4, n_test=2),
    }


def paired_argv(assets, output: Path, *extra: str) -> list[str]:
    return [
        "--dataset", str(assets["data"]), "--output", str(output), "--base", str(assets["base"]),
        "--clip-model", str(assets["clip"]), "--disc-backbone", str(assets["clip"]), "--no-lpips-pretrained",
        "--train-image-prep", "no_resize", "--test-image-prep", "no_resize", "--batch-size", "2",
        "--lr", "1e-3", "--cpu", "--report-to", "none", "--num-eval-samples", "2", "--lambda-gan", "0",
        "--lambda-clipsim", "0", "--log-every", "1", *extra,
    ]  # fmt: skip


def test_a_failed_push_leaves_training_running_and_the_next_push_uploads_the_latest_state(
    assets, tmp_path, monkeypatch, capsys, caplog
):
    """--push-every-checkpoint with the first upload failing: training ends normally, every checkpoint
    is intact, a later push succeeds, and the last one is the final model with its card, grid and
    options; read back from a Hub-layout cache it holds the local file's tensors."""
    rec = Recorder(monkeypatch, fail=[http_error(500)])
    run = tmp_path / "run"
    argv = paired_argv(
        assets, run, "--max-steps", "3", "--checkpoint-every", "1", "--keep-last", "0", "--eval-every", "1",
        "--push-to-hub", "me/x", "--push-every-checkpoint", "--push-dataset", "me/shapes",
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="training.hub_push"):
        assert paired_main(argv) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 3
    # the first upload failed (a 500), with a warning, and training went on to the end
    assert rec.commits[0]["error"] is not None
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == HUB_LOG]
    assert "failed (training goes on; the next push uploads the latest state" in warning.getMessage()
    assert "upload to me/x failed: HfHubHTTPError: 500" in warning.getMessage()
    for step in (1, 2, 3):
        load_checkpoint(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors")
    # later pushes went through; the last is the final model
    assert len(rec.commits) >= 2 and rec.commits[-1] is rec.sent[-1]
    final = rec.sent[-1]
    assert final["commit_message"] == "Trained model, step 3"
    assert all(
        r == {"repo_id": "me/x", "repo_type": "model", "private": False, "exist_ok": True} for r in rec.repos
    )
    files = final["files"]
    assert sorted(files) == ["README.md", "model.safetensors", "training_config.json", "validation.png"]
    assert files["model.safetensors"] == (run / "model.safetensors").read_bytes()
    assert files["validation.png"] == (run / "eval" / "step_00000003.png").read_bytes()
    config = json.loads(files["training_config.json"])
    assert (config["max_steps"], config["push_to_hub"], config["lambda_l2"]) == (3, "me/x", 1.0)
    data = card_data(files["README.md"])
    assert data["tags"] == ["turbo", "pix2pix-turbo", "lora", "image-to-image"]
    assert data["datasets"] == ["me/shapes"]
    assert "base_model" not in data  # a local tiny base: nothing on the Hub to link to
    body = ModelCard(files["README.md"].decode()).text
    assert "Trained with `python -m training.paired` for 3 steps." in body
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"| l2 | {last['val/l2']:.4g} | lower |" in body
    assert "![validation samples](validation.png)" in body
    assert f"--base {assets['base']}" in body  # the command line needs the same base
    # nothing left staged once the final push is up
    assert not any((run / STAGING).iterdir())
    # a checkpoint pushed later by hand gets the figures and the grid of its own step
    code, _, err = run_cli(["push", str(run / "checkpoints" / "step_00000002" / "model.safetensors"), "me/x"],
                           capsys)  # fmt: skip
    assert (code, err) == (0, "")
    files2 = rec.commits[-1]["files"]
    assert files2["validation.png"] == (run / "eval" / "step_00000002.png").read_bytes()
    at_2 = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val_2 = [line for line in at_2 if line["step"] == 2 and "val/l2" in line][-1]["val/l2"]
    body2 = ModelCard(files2["README.md"].decode()).text
    assert "Trained with `python -m training.paired` for 2 steps of 3." in body2
    assert f"| l2 | {val_2:.4g} | lower |" in body2 and "Validation (step 2):" in body2
    assert json.loads(files2["training_config.json"]) == config
    # read back as the Hub serves it (a cache laid out as huggingface_hub lays it out, offline):
    # the same tensors as the local file
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    snapshot = add_to_hub_cache(tmp_path / "cache", "me/x", dict(files), commit=SHA)
    path = model_file("me/x")
    assert path == snapshot / "model.safetensors"
    pushed, local = flat(load_checkpoint(path)), flat(load_checkpoint(run / "model.safetensors"))
    assert pushed.keys() == local.keys() and all(torch.equal(pushed[k], local[k]) for k in local)
    # and the same image, the model named by its Hub id
    pipe = Pipeline(str(assets["base"]), device="cpu", max_models=2)
    photo = Image.open(next((assets["data"] / "test_A").iterdir())).convert("RGB")
    from_hub = pipe.translate(photo, "me/x", "a shape").image
    from_disk = pipe.translate(photo, run / "model.safetensors", "a shape").image
    assert np.array_equal(np.asarray(from_hub), np.asarray(from_disk))
    assert np.asarray(from_hub).std() > 0  # an image, not a blank


def test_an_unpaired_run_pushes_both_directions_and_its_dino_figures(assets, tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    data = make_domains_dataset(tmp_path / "domains", n_train=(2, 2), n_test=(2, 2))
    cfg = UnpairedConfig(
        dataset=str(data), output=str(tmp_path / "run"), base=str(assets["base"]),
        disc_backbone=str(assets["clip"]), dino_model=str(make_tiny_dino(tmp_path / "dino")),
        lpips_pretrained=False, train_image_prep="no_resize", test_image_prep="no_resize", batch_size=1,
        max_steps=1, rank_unet=4, eval_every=1, checkpoint_every=0, cpu=True, report_to="none",
        lambda_cycle_lpips=0, lambda_idt_lpips=0, push_to_hub="me/h2z", push_private=True,
    )  # fmt: skip
    result = train_unpaired(cfg)
    [repo] = rec.repos
    assert repo["private"] is True
    [commit] = rec.commits
    files = commit["files"]
    assert files["model.safetensors"] == (tmp_path / "run" / "model.safetensors").read_bytes()
    assert card_data(files["README.md"])["tags"] == ["turbo", "cyclegan-turbo", "lora", "image-to-image"]
    body = ModelCard(files["README.md"].decode()).text
    for d in ("a2b", "b2a"):
        assert f"python -m turbo translate --model me/h2z --direction {d} --input input.png" in body
        value = result.metrics[f"val/dino_struct_{d}"]
        assert f"| dino_struct_{d} | {value:.4g} | lower |" in body
    assert "Validation samples at step 1 (columns: input, output):" in body
    assert "Trained with `python -m training.unpaired` for 1 step." in body


def test_a_failed_final_push_is_reported_and_keeps_the_files(assets, tmp_path, monkeypatch, capsys, caplog):
    rec = Recorder(monkeypatch, fail=[ConnectionError("Network is unreachable")])
    run = tmp_path / "run"
    with caplog.at_level(logging.ERROR, logger="training.hub_push"):
        code = paired_main(paired_argv(assets, run, "--max-steps", "1", "--eval-every", "0",
                                       "--push-to-hub", "me/x"))  # fmt: skip
    assert code == 0  # the model is trained and on disk: the run itself did not fail
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 1
    [commit] = rec.commits
    assert commit["commit_message"] == "Trained model, step 1"
    assert sorted(commit["files"]) == ["README.md", "model.safetensors", "training_config.json"]  # no grid
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name == HUB_LOG]
    model = run / "model.safetensors"
    assert error == (
        f"the push of {model} to me/x failed: upload to me/x failed: the Hub could not be reached "
        f"(ConnectionError: Network is unreachable); push it again with: python -m turbo push {model} me/x "
        f"--run {run}"
    )
    kept = run / STAGING / "final_00000001"
    assert (kept / "model.safetensors").read_bytes() == model.read_bytes()
    # that command pushes the same files again
    rec.fail = []
    code, _, err = run_cli(["push", str(model), "me/x", "--run", str(run)], capsys)
    assert (code, err) == (0, "")
    assert rec.commits[-1]["files"].keys() == commit["files"].keys()
    assert rec.commits[-1]["files"]["model.safetensors"] == commit["files"]["model.safetensors"]
    assert json.loads(rec.commits[-1]["files"]["training_config.json"]) == json.loads(
        commit["files"]["training_config.json"]
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--push-to-hub", "not an id"], "error: --push-to-hub 'not an id' is not a Hub repo id: give "
         "owner/name"),
        (["--push-every-checkpoint"], "error: --push-every-checkpoint needs --push-to-hub owner/name"),
        (["--push-to-hub", "me/x", "--push-dataset", "a/b/c"], "error: --push-dataset 'a/b/c' is not a Hub "
         "dataset id (owner/name)"),
    ],
)  # fmt: skip
def test_bad_push_options_fail_before_the_base_loads(assets, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr("training.trainer.load_base", lambda *a, **k: pytest.fail("the base was loaded"))
    argv = paired_argv(assets, tmp_path / "run", "--max-steps", "1", *extra)
    assert paired_main(argv) == 2
    assert capsys.readouterr().err.startswith(message)


def test_no_token_fails_before_the_base_loads(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("training.trainer.load_base", lambda *a, **k: pytest.fail("the base was loaded"))
    argv = paired_argv(assets, tmp_path / "run", "--max-steps", "1", "--push-to-hub", "me/x")
    assert paired_main(argv) == 2
    assert capsys.readouterr().err == (
        "error: not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN to a token with "
        "write access\n"
    )


def test_a_push_waiting_behind_an_upload_is_replaced_by_a_newer_one(models, tmp_path, monkeypatch):
    """Uploads never queue up behind a slow one: of the pushes made meanwhile only the newest is sent."""
    gate = threading.Event()
    rec = Recorder(monkeypatch, fail=[http_error(503)], gate=gate)
    cfg = CommonConfig(str(tmp_path), str(tmp_path / "run"), max_steps=10, push_to_hub="me/x",
                       push_every_checkpoint=True)  # fmt: skip
    hub = HubPush(cfg, is_main=True)
    ckpt = load_checkpoint(models / "paired.safetensors")
    model = models / "paired.safetensors"
    hub.checkpoint(1, ckpt, model)
    assert rec.started.wait(30)  # step 1 is uploading (held by the gate)
    hub.checkpoint(2, ckpt, model)
    hub.checkpoint(3, ckpt, model)  # replaces step 2, still waiting
    assert sorted(p.name for p in (tmp_path / "run" / STAGING).iterdir()) == [
        "step_00000001",
        "step_00000003",
    ]
    hub.checkpoint(10, ckpt, model)  # the last step: left to finish
    gate.set()
    deadline = time.monotonic() + 60  # step 3 goes up once step 1's upload is let through
    while len(rec.commits) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hub.finish(10, ckpt, model) is True  # (a push still waiting would be replaced by it)
    messages = [(c["commit_message"], c["error"] is None) for c in rec.commits]
    assert messages == [
        ("Training checkpoint, step 1", False),
        ("Training checkpoint, step 3", True),
        ("Trained model, step 10", True),
    ]
    assert list((tmp_path / "run" / STAGING).iterdir()) == []


def test_a_push_that_cannot_be_prepared_never_stops_training(models, tmp_path, monkeypatch, caplog):
    import training.hub_push as hub_push

    rec = Recorder(monkeypatch)
    cfg = CommonConfig(str(tmp_path), str(tmp_path / "run"), max_steps=10, push_to_hub="me/x",
                       push_every_checkpoint=True)  # fmt: skip
    hub = HubPush(cfg, is_main=True)
    ckpt, model = load_checkpoint(models / "paired.safetensors"), models / "paired.safetensors"
    real_stage = hub_push.stage

    def broken(*args):
        raise KeyError("a bug in the card")

    monkeypatch.setattr(hub_push, "stage", broken)
    with caplog.at_level(logging.WARNING, logger=HUB_LOG):
        hub.checkpoint(1, ckpt, model)  # returns: nothing raised into the training loop
    [warning] = [r.getMessage() for r in caplog.records if r.name == HUB_LOG]
    assert warning == "could not prepare the push of step 1 to me/x: 'a bug in the card'"
    monkeypatch.setattr(hub_push, "stage", real_stage)
    assert hub.finish(10, ckpt, model) is True
    assert [c["commit_message"] for c in rec.commits] == ["Trained model, step 10"]


def test_other_processes_never_push(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    cfg = CommonConfig(str(tmp_path), str(tmp_path / "run"), push_to_hub="me/x", push_every_checkpoint=True)
    hub = HubPush(cfg, is_main=False)
    hub.checkpoint(1, None, tmp_path / "none")
    assert hub.finish(2, None, tmp_path / "none") is True
    assert rec.commits == [] and not (tmp_path / "run").exists()


def test_push_options_validate_in_the_config():
    with pytest.raises(ConfigError, match="^--push-private needs --push-to-hub owner/name$"):
        CommonConfig("d", "o", push_private=True).validate()
