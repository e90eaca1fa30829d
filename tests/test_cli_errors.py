"""Mistaken input and interruptions end in one line on standard error, never a traceback:
exit 2 for an error, 130 for Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO, corrupt_copy
from deploy.cli import main as cli
from specmoe.config import CacheBudget, DecoderConfig, parse_budget
from specmoe.shards import PrepareConfig, ShardReader, prepare

GENERATE = ["generate", "--prompt", "ROMEO:", "--max-new-tokens", "2"]


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def truncated_model(shipped_model, tmp_path):
    model = tmp_path / "truncated"
    shutil.copytree(shipped_model, model)
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return model


def test_a_truncated_checkpoint_is_one_line_in_generate(truncated_model, capsys):
    assert cli([*GENERATE, "--model", str(truncated_model)]) == 2
    one_line_error(capsys, "specmoe generate: error:", str(truncated_model / "model.safetensors"), "truncated")


def test_a_truncated_checkpoint_is_one_line_in_prepare(truncated_model, tmp_path, capsys):
    assert cli(["prepare", str(truncated_model), str(tmp_path / "out")]) == 2
    one_line_error(capsys, "specmoe prepare: error:", str(truncated_model / "model.safetensors"), "truncated")


def test_invalid_json_in_config_names_the_file(shipped_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(shipped_model, model)
    (model / "config.json").write_text('{"model_type": "mixtral",')
    assert cli([*GENERATE, "--model", str(model)]) == 2
    one_line_error(capsys, str(model / "config.json"), "not valid JSON")


@pytest.mark.parametrize("budget", ["inf", "nan", "2", "1.5", "-1", "0", "0%", "150%", "1.5B", "64XB", "1e9", ""])
def test_a_bad_cache_budget_names_the_flag_and_the_allowed_forms(budget, capsys):
    assert cli([*GENERATE, "--mode", "ondemand", "--cache-budget", budget]) == 2
    one_line_error(capsys, "--cache-budget", "25%", "64MB", repr(budget))


@pytest.mark.parametrize("text, budget", [
    ("25%", CacheBudget(fraction=0.25)), ("0.25", CacheBudget(fraction=0.25)), ("1", CacheBudget(fraction=1.0)),
    ("100%", CacheBudget(fraction=1.0)), ("64MB", CacheBudget(nbytes=64 * 10**6)), ("1.5GiB", CacheBudget(nbytes=3 * 2**29)),
    ("1000000B", CacheBudget(nbytes=10**6)), ("1B", CacheBudget(nbytes=1)), (" 2 kib ", CacheBudget(nbytes=2048)),
    (0.5, CacheBudget(fraction=0.5)),
])
def test_the_unit_of_a_budget_is_in_its_syntax(text, budget):
    assert parse_budget(text) == budget


def test_budget_bytes_never_guess_the_unit_from_the_number():
    expert_bytes = 10**6
    assert DecoderConfig(cache_budget="1B").budget_bytes(expert_bytes) == 1  # one byte, not 100%
    assert DecoderConfig(cache_budget="25%").budget_bytes(expert_bytes) == 250_000
    assert DecoderConfig(cache_budget=1.0).budget_bytes(expert_bytes) == expert_bytes
    assert DecoderConfig(cache_budget="64MB").budget_bytes(expert_bytes) == 64 * 10**6
    for bad in (2, 1.5, 64_000_000, float("inf"), float("nan"), -0.25, True, "2"):
        with pytest.raises(ValueError, match=r"cache_budget must be a fraction .* or a size with its unit"):
            DecoderConfig(cache_budget=bad)


def test_the_benchmark_takes_the_same_budget_syntax(capsys):
    sys.path.insert(0, str(REPO))
    from bench.modes import budget_fraction

    assert budget_fraction("25%") == budget_fraction("0.25") == 0.25
    for bad in ("2", "inf", "64MB"):
        with pytest.raises(Exception, match="fraction"):
            budget_fraction(bad)


@pytest.mark.parametrize("flags, needles", [
    (["--experts", "ray"], ["--experts ray", "--mode resident"]),
    (["--experts", "grpc", "--mode", "resident"], ["--experts grpc", "--mode resident"]),
    (["--remote-compute", "--mode", "specmoe", "--experts", "ray"], ["--remote-compute", "--experts grpc"]),
    (["--remote-compute", "--mode", "ondemand"], ["--remote-compute", "--experts local"]),
    (["--remote-compute", "--mode", "resident"], ["--remote-compute", "--mode resident"]),
    (["--grpc-token", "t", "--mode", "ondemand", "--experts", "ray"], ["--grpc-token", "--experts grpc"]),
    (["--shadow-bits", "8", "--mode", "ondemand"], ["--shadow-bits", "--draft-policy shadow"]),
    (["--shadow-bits", "8", "--mode", "specmoe", "--draft-policy", "hot"], ["--shadow-bits", "--draft-policy shadow"]),
    (["--grpc-tls-cert", "c.pem", "--grpc-tls-key", "k.pem", "--mode", "ondemand"], ["--grpc-tls-cert", "--experts grpc"]),
    (["--grpc-tls-cert", "c.pem", "--mode", "ondemand", "--experts", "grpc"], ["--grpc-tls-cert and --grpc-tls-key"]),
])
def test_flags_that_would_be_ignored_are_refused_before_anything_starts(flags, needles, capsys):
    import ray

    assert cli([*GENERATE, *flags]) == 2
    one_line_error(capsys, "specmoe generate: error:", *needles)
    assert not ray.is_initialized()  # refused before a cluster started


def test_a_corrupt_shard_is_one_line_with_the_command_that_fixes_it(shipped_model, tmp_path, monkeypatch, capsys):
    prepare(PrepareConfig(shipped_model, tmp_path / "good"), progress=False)
    corrupt_copy(tmp_path / "good", tmp_path / "bad", 0, 1, "down")

    def read_a_corrupt_shard(args):  # a command that meets the corrupt shard (CorruptShardError is a RuntimeError)
        ShardReader(tmp_path / "bad").read(0, 1)

    monkeypatch.setattr("specmoe.shards.run_prepare", read_a_corrupt_shard)
    assert cli(["prepare", str(shipped_model), str(tmp_path / "elsewhere")]) == 2
    one_line_error(capsys, "L000-E001.safetensors", f"specmoe prepare {shipped_model.resolve()} {tmp_path / 'bad'}")


def test_ctrl_c_is_one_line_and_exit_130(shipped_model):
    child = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "generate", "--prompt", "ROMEO:", "--max-new-tokens", "500", "--mode", "ondemand"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout.read(1)  # generating: the first text arrived
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert err.strip() == "specmoe generate: interrupted", err


def test_a_ctrl_c_whose_keyboardinterrupt_was_swallowed_still_ends_in_130(monkeypatch, capsys):
    """Python only prints a KeyboardInterrupt raised inside a finalizer or a callback; the
    recorded Ctrl-C still decides the exit, and the handler is put back afterwards."""
    import deploy.cli

    before = signal.getsignal(signal.SIGINT)

    def run_swallowing(args):
        try:
            signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, through the CLI's handler
        except KeyboardInterrupt:
            pass  # as if raised inside a __del__: printed, not propagated
        return 0

    monkeypatch.setattr(deploy.cli, "_run", run_swallowing)
    assert cli(["generate", "--prompt", "ROMEO:"]) == 130
    assert capsys.readouterr().err.strip() == "specmoe generate: interrupted"
    assert signal.getsignal(signal.SIGINT) is before


def test_grpc_token_and_tls_flags_reach_the_deployment_spec(monkeypatch, capsys):
    """The flags become the spec's TransportSpec, which build_deployment hands to the stores and to
    every gRPC client (tests/test_deployment.py checks that path on a cluster)."""
    import deploy.client

    seen = {}

    def connect(address=None, spec=None):
        seen["transport"] = spec.transport
        raise ValueError("stop before a cluster starts")

    monkeypatch.setattr(deploy.client, "connect", connect)
    flags = ["--mode", "ondemand", "--experts", "grpc", "--grpc-token", "s3cret",
             "--grpc-tls-cert", "cert.pem", "--grpc-tls-key", "key.pem"]
    assert cli([*GENERATE, *flags]) == 2
    t = seen["transport"]
    assert (t.kind, t.token, t.tls_cert, t.tls_key) == ("grpc", "s3cret", "cert.pem", "key.pem")
    assert "s3cret" not in repr(t)  # the token stays out of logs


def test_shadow_bits_reach_the_decoder_config():
    from deploy.cli import build_parser, decoder_config

    args = build_parser().parse_args([*GENERATE, "--mode", "specmoe", "--shadow-bits", "8"])
    assert decoder_config(args).shadow_bits == 8
    assert decoder_config(build_parser().parse_args([*GENERATE, "--mode", "specmoe"])).shadow_bits == 4
