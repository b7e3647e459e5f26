"""Two processes on the loopback address drive one 1x4 mesh (2 CPU devices each) through
`jax.distributed` (`--coordinator`), and generate what one process generates alone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from coreinfer_jax import Dense, Generator, Stability

PROMPT = "The quick brown fox"
SPARSE = ["--method", "stability", "--keep", "0.5", "--layers", "0:2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(checkpoint, method_args: list[str]) -> list[subprocess.CompletedProcess]:
    port = free_port()
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "coreinfer_jax", "generate", "--checkpoint", str(checkpoint), "--prompt", PROMPT,
         "--max-new-tokens", "8", "--mesh", "1x4", "--json", "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(i), "--raw", *method_args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("method_args, method", [([], Dense()),
                                                 (SPARSE, Stability(keep=0.5, layers=(0, 2), shards=4))])
def test_two_processes_generate_what_one_does(tiny_checkpoint, method_args, method) -> None:
    checkpoint = tiny_checkpoint("llama_tied")
    (out0, _), (out1, _) = run_two_processes(checkpoint, method_args)
    # Gloo's threads write their connection log to stdout, at times interleaved mid-line; our
    # report is the one JSON line, and only process 0 writes it.
    ours = [[line for line in out.splitlines() if line.startswith("{")] for out in (out0, out1)]
    assert len(ours[0]) == 1 and ours[1] == []
    got = json.loads(ours[0][0])
    want = Generator.load(checkpoint).generate(PROMPT, 8, method=method, stop_at_eos=True)
    assert got["tokens"] == want.tokens[0]
    if method_args:
        assert got["core_neurons"] == want.core_neurons[0].tolist()
        assert got["shards"] == 4


def test_bad_process_settings_say_what_is_wrong(tiny_checkpoint, capsys) -> None:
    from coreinfer_jax.tools.cli import main

    assert main(["generate", "--checkpoint", str(tiny_checkpoint("llama")), "--prompt", PROMPT,
                 "--coordinator", "localhost", "--num-processes", "2"]) == 2
    assert "--coordinator must be HOST:PORT" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tiny_checkpoint("llama")), "--prompt", PROMPT,
                 "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"]) == 2
    assert "--process-id must be in 0..1" in capsys.readouterr().err
