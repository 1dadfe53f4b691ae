"""Every Hub request is bounded (`pipeline.store.hub`, params `hub.timeout_s` and `hub.tries`): against an endpoint that
accepts connections and never answers, the push (export's and `DPOTrainer.push_to_hub`) fails after `hub.tries`
tries in one sentence naming the host, the time-out and the fix, the local export intact; revision resolution falls
back to the local cache in bounded time; a model load by Hub id ends in a sentence, not a hang."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from pipeline.core.errors import PipelineError


class SilentHub:
    """A TCP server on the loopback that accepts every connection, reads, and never answers; counts connections."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.open = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self.open.append(conn)  # kept open, never answered

    def requests(self, path: str) -> int:
        """How many connections asked for `path` (huggingface_hub also makes one-off lookups of its own)."""
        asked = 0
        for conn in self.open:
            conn.settimeout(1.0)
            try:
                asked += path.encode() in conn.recv(4096).split(b"\r\n", 1)[0]
            except OSError:
                pass
        return asked

    def close(self):
        for conn in self.open:
            conn.close()
        self.sock.close()


@pytest.fixture
def silent_hub(monkeypatch):
    from huggingface_hub import constants

    from pipeline.store import hub

    server = SilentHub()
    endpoint = f"http://127.0.0.1:{server.port}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    monkeypatch.setattr(hub.time, "sleep", lambda s: None)  # the pause between tries: not what is tested
    hub.configure_network(timeout_s=0.5, tries=2)
    yield server
    hub.configure_network()
    server.close()


def assert_one_sentence(err: PipelineError, server: SilentHub) -> None:
    text = str(err)
    assert f"127.0.0.1:{server.port} did not answer within 0.5 s, 2 times" in text, text
    assert "raise hub.timeout_s or hub.tries" in text and "HF_HUB_OFFLINE=1" in text
    assert "hf_xxx" not in text


def test_the_export_push_to_a_silent_hub_fails_after_its_tries_and_leaves_the_export(silent_hub, tmp_path, capsys):
    from pipeline.publish.export import push_to_hub

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "manifest.json").write_text("{}")
    started = time.monotonic()
    with pytest.raises(PipelineError) as caught:
        push_to_hub(folder, "me/model")
    assert time.monotonic() - started < 20
    assert_one_sentence(caught.value, silent_hub)
    assert "push to the Hub repo 'me/model' failed" in str(caught.value) and "is intact" in str(caught.value)
    assert silent_hub.requests("/api/repos/create") == 2  # exactly hub.tries tries
    waited = capsys.readouterr().err
    assert (
        f"creating the Hub repo 'me/model' at 127.0.0.1:{silent_hub.port} (waiting up to 0.5 s, try 2 of 2)" in waited
    )
    assert (folder / "model.safetensors").read_bytes() == b"weights"


def test_trainer_push_to_hub_to_a_silent_hub_is_one_sentence(silent_hub, tmp_path, tiny_model, tiny_tokenizer):
    import datasets

    from conftest import random_pairs
    from pipeline import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        hub_model_id="me/model",
        max_steps=1,
        per_device_train_batch_size=2,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=tiny_model,
        args=args,
        train_dataset=datasets.Dataset.from_list(random_pairs(4)),
        processing_class=tiny_tokenizer,
    )
    started = time.monotonic()
    with pytest.raises(PipelineError) as caught:
        trainer.push_to_hub()
    assert time.monotonic() - started < 30
    # under a loaded machine the loopback may refuse one connection: either way, tried hub.tries times, one sentence
    text = str(caught.value)
    assert any(
        f"127.0.0.1:{silent_hub.port} {said}, 2 times" in text
        for said in ("did not answer within 0.5 s", "could not be reached")
    ), text
    assert "push_to_hub to the Hub repo 'me/model' failed" in str(caught.value)
    assert "No model was saved" in str(caught.value)  # the repo is made before the save: said, not claimed kept

    trainer.save_model()
    saved = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(PipelineError, match="is intact"):
        trainer.push_to_hub()
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == saved


def test_resolving_a_revision_against_a_silent_hub_falls_back_to_the_cache_in_bounded_time(silent_hub):
    from pipeline.store.hub import resolve_commit

    started = time.monotonic()
    with pytest.warns(UserWarning) as warned:
        assert resolve_commit("org/model", None, key="model.name_or_path") is None  # nothing cached
    assert time.monotonic() - started < 20
    text = " ".join(str(w.message) for w in warned)
    assert "did not answer within 0.5 s, 2 times" in text and "local Hub cache has no revision main" in text
    assert silent_hub.requests("/api/models/org/model") == 2


def test_a_model_load_by_hub_id_from_a_silent_hub_ends_in_a_sentence(silent_hub):
    from pipeline.model.loading import load_causal_lm

    started = time.monotonic()
    with pytest.raises(PipelineError, match=r"model 'org/model': could not be loaded"):
        load_causal_lm("org/model")
    assert time.monotonic() - started < 60


def test_network_params_are_checked_and_documented():
    from pipeline.config.params import check_params

    assert check_params({})["hub"] == {"timeout_s": 30.0, "tries": 3}
    with pytest.raises(PipelineError, match=r"hub\.tries must be >= 1"):
        check_params({"hub": {"tries": 0}})
