"""``[provider] models`` and ``model_cache_bytes``: model ids or "*", each mistake named by file and key."""

from __future__ import annotations

import pytest

from p2pgpu.config import MODEL_WILDCARD, ConfigError, parse_config, render_config

MODEL_A = "ab" * 32
MODEL_B = "CD" * 32


def _parse(provider: str):
    return parse_config(f'roles = ["provider"]\n[provider]\n{provider}\n', source="node.toml", check_files=False)


def test_model_ids_are_read_lowercased_with_a_budget() -> None:
    cfg = _parse(f'models = ["{MODEL_A}", "{MODEL_B}"]\nmodel_cache_bytes = 1000')
    assert cfg.provider.models == (MODEL_A, MODEL_B.lower())
    assert cfg.provider.model_cache_bytes == 1000


def test_no_models_by_default_and_the_wildcard_alone() -> None:
    assert _parse("").provider.models == ()
    assert _parse('models = ["*"]').provider.models == (MODEL_WILDCARD,)


def test_rendered_models_load_back() -> None:
    cfg = _parse(f'models = ["{MODEL_A}"]\nmodel_cache_bytes = 5')
    again = parse_config(render_config(cfg), source="node.toml", check_files=False)
    assert again.provider.models == cfg.provider.models
    assert again.provider.model_cache_bytes == 5


@pytest.mark.parametrize(("line", "key", "problem"), [
    ('models = ["all"]', "provider.models[0]", "did you mean '*'?"),
    ('models = ["resnet"]', "provider.models[0]", "expected 64 hex digits"),
    (f'models = ["{MODEL_A[:-1]}"]', "provider.models[0]", "expected 64 hex digits"),
    ('models = [7]', "provider.models[0]", "expected a string"),
    ('models = "*"', "provider.models", "expected an array of strings"),
    (f'models = ["*", "{MODEL_A}"]', "provider.models[0]", "list it alone"),
    (f'models = ["{MODEL_A}", "{MODEL_A.upper()}"]', "provider.models[1]", "the same model as provider.models[0]"),
    ("model_cache_bytes = -1", "provider.model_cache_bytes", "out of range"),
    ("modles = []", "provider.modles", "did you mean 'models'?"),
])
def test_bad_models_name_file_key_and_problem(line: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        _parse(line)
    assert err.value.source == "node.toml"
    assert err.value.key == key
    assert problem in err.value.problem
