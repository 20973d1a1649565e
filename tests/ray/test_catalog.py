"""The cluster's adapter catalog: names to folders, with the allowed-folder rule (issue 14; S6.1).

No Ray needed: the catalog is plain Python, used by the router and by every replica.
"""

from __future__ import annotations

import os

import pytest

from loramux.ray.catalog import Catalog
from loramux.server.protocol import APIError


def _adapter(path):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    return path


def test_S6_1_names_resolve_from_modules_and_allowed_folders_and_nothing_else(tmp_path):
    allowed = tmp_path / "allowed"
    _adapter(allowed / "good")
    outside = _adapter(tmp_path / "outside" / "secret")
    os.symlink(outside, allowed / "link")  # a folder inside that points outside
    (allowed / "empty").mkdir()  # no adapter_config.json: not an adapter
    named = _adapter(tmp_path / "named")
    cat = Catalog.create("base", [("mine", str(named))], [str(allowed)])

    assert cat.path("mine") == str(named)
    assert cat.path("good") == str((allowed / "good").resolve())
    assert cat.names() == ["mine", "good"]
    with pytest.raises(APIError) as e:
        cat.path("link")
    assert (
        e.value.status == 403 and "outside the allowed adapter folders" in e.value.body()["error"]["message"]
    )
    for bad in ("../outside/secret", "nope", "", ".", "..", "empty", "good/../good", "x" * 300):
        with pytest.raises(APIError) as e:
            cat.path(bad)
        assert e.value.status == 404 and e.value.body()["error"]["code"] == "model_not_found"


def test_S6_1_no_allowed_folders_means_only_the_named_modules(tmp_path):
    cat = Catalog.create("base", [], [])
    assert cat.names() == []
    with pytest.raises(APIError) as e:
        cat.path("anything")
    assert "--allowed-lora-dirs" in e.value.body()["error"]["message"]
