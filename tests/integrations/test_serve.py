"""`hf-multimax-serve`: transformers' OpenAI-compatible server, started for real on 127.0.0.1 with a
MultiMax checkpoint of the real SmolLM2 whose scalars are far from identity, answers chat completions
(streaming and not, with and without continuous batching) with exactly the text local greedy
`generate` gives, which differs from what softmax attention gives. The server is stopped by the test."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from hf_multimax import MultiMaxModulator

pytest.importorskip("fastapi", reason="serving needs transformers' serving extras: pip install 'hf-multimax[serve]'")
from openai import OpenAI  # noqa: E402

from experiments.smollm2 import chat_prompt, load_smollm2  # noqa: E402

QUESTION = "What is the capital of France?"
NEW_TOKENS = 12


def answer(model, tokenizer):
    ids = chat_prompt(tokenizer, QUESTION)
    out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, tokenizer = load_smollm2("multimax")
    torch.manual_seed(0)
    with torch.no_grad():  # "trained": far enough from identity to change the answer
        for layer in model.modules():
            if isinstance(layer, MultiMaxModulator):
                layer.t1.normal_(0.0, 1.0)
                layer.t2.normal_(0.0, 1.0)
    model.generation_config.do_sample = False  # the server's requests below set no sampling
    folder = tmp_path_factory.mktemp("served") / "smollm2-multimax"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    softmax, _ = load_smollm2("sdpa")
    return folder, answer(model, tokenizer), answer(softmax, tokenizer)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--continuous-batching"]], ids=["generate", "continuous_batching"])
def test_served_text_equals_local_generate(checkpoint, flags, tmp_path):
    folder, local, softmax = checkpoint
    assert local != softmax  # so equal text below shows the plugin ran in the server
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "hf_multimax.serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
         "--device", "cpu", *flags],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up in 300 s"
            time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        messages = [{"role": "user", "content": QUESTION}]
        reply = client.chat.completions.create(model=str(folder), messages=messages, max_tokens=NEW_TOKENS)
        assert reply.choices[0].message.content == local
        chunks = client.chat.completions.create(model=str(folder), messages=messages, max_tokens=NEW_TOKENS,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == local
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as response:
            assert any(m["id"] == str(folder) for m in json.load(response)["data"])
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    assert "UNEXPECTED" not in (tmp_path / "server.log").read_text()  # every trained scalar was loaded
