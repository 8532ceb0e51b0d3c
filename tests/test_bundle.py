

def test_default_bundle_lookup_takes_any_model_name():
    from collocate.bundle import default_bundle_for

    assert default_bundle_for("smollm2-135m").endswith("smollm2-135m-k4")
    for name in ("/abs/path/qwen", "models/qwen2.5-coder-1.5b", "Qwen/Qwen2.5-1.5B-Instruct", "smollm2", "*"):
        assert default_bundle_for(name) is None
