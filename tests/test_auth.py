"""API keys and scopes: 401/403 as JSON errors, the route-to-scope table, the keys file, the keys CLI, and
CVAT's access to the Nuclio routes (the CVAT listener and the address allow-list)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.api.auth import KeysFileError, hash_key, new_key, route_scopes, unmapped_routes
from server.api.middleware import CvatListener
from server.api.route_index import route_templates
from server.app import create_app
from server.cli import main

from .conftest import make_settings

ALICE, BOB, ADMIN = new_key(), new_key(), new_key()  # interactive; jobs (keys file); admin


def entry(key_id: str, key: str, *scopes: str) -> dict:
    return {"id": key_id, "hash": hash_key(key), "scopes": list(scopes)}


def write_keys(path: Path, *entries: dict) -> None:
    """As an editor saves: a new file renamed over the old one."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text("# labelserve keys\n" + "".join(json.dumps(e) + "\n" for e in entries))
    os.replace(temporary, path)


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.jsonl"
    write_keys(path, entry("bob", BOB, "jobs"))
    return path


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, keys_file: Path) -> FastAPI:
    tmp = tmp_path_factory.mktemp("auth")
    settings = make_settings(
        tmp,
        models=[],  # access control needs no model
        data_dir=tmp / "data",
        api_keys=[entry("alice", ALICE, "interactive"), entry("root", ADMIN, "admin", "metrics")],
        api_keys_file=keys_file,
        cvat_allow_ips=["10.20.0.0/16"],
    )
    return create_app(settings, load_models_in_background=False)


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_missing_key_is_a_401_json_error_with_a_bearer_challenge(client: TestClient) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_api_key"
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_unknown_key_is_a_401(client: TestClient) -> None:
    for headers in (bearer(new_key()), {"X-API-Key": "lsk_guess"}, {"Authorization": "Basic " + ALICE}):
        response = client.get("/v1/models", headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] in ("invalid_api_key", "missing_api_key")
    assert client.get("/v1/models", headers=bearer(new_key())).json()["error"]["code"] == "invalid_api_key"


def test_a_key_without_the_scope_is_a_403(client: TestClient) -> None:
    response = client.delete("/v1/cache", headers=bearer(ALICE))
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "insufficient_scope" and "admin" in error["message"]
    assert client.get("/v1/jobs", headers=bearer(ALICE)).status_code == 403
    assert client.get("/v1/trackers", headers=bearer(BOB)).status_code == 403


def test_the_right_scope_passes_by_bearer_or_x_api_key(client: TestClient) -> None:
    assert client.get("/v1/models", headers=bearer(ALICE)).status_code == 200
    assert client.get("/v1/models", headers={"X-API-Key": ALICE}).status_code == 200
    assert client.get("/v1/models", headers={"authorization": f"bearer  {ALICE} "}).status_code == 200
    assert client.get("/v1/jobs", headers=bearer(BOB)).status_code == 200  # a keys-file key
    assert client.delete("/v1/cache", headers=bearer(ADMIN)).status_code == 200
    assert client.get("/metrics", headers=bearer(ADMIN)).status_code == 200
    assert client.get("/metrics", headers=bearer(ALICE)).status_code == 403


def test_whoami_tells_a_key_its_scopes_and_the_console_page_needs_no_key(client: TestClient) -> None:
    assert client.get("/v1/whoami").status_code == 401
    assert client.get("/v1/whoami", headers=bearer(ALICE)).json() == {
        "auth": True, "id": "alice", "scopes": ["interactive"],
    }  # fmt: skip
    page = client.get("/")
    assert page.status_code == 200 and "labelserve console" in page.text
    assert client.get("/console/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/console/nothing.js").status_code == 404  # only the console's own files
    assert client.get("/console/..%2Fauth.py").status_code == 401  # no route: a key first, as anywhere


def test_health_probes_are_open(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_the_body_is_not_read_before_the_key_is_checked(client: TestClient) -> None:
    """A 401, not a 422 for the invalid body: strangers learn nothing and cost nothing."""
    response = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 401


def test_unknown_paths_need_a_key_before_they_are_a_404(client: TestClient) -> None:
    assert client.get("/v1/nothing-here").status_code == 401
    assert client.get("/v1/nothing-here", headers=bearer(ALICE)).status_code == 404
    assert client.post("/v1/models", headers=bearer(ALICE)).status_code == 405


def test_every_route_has_a_scope(app: FastAPI) -> None:
    templates = route_templates(app.routes)
    assert {"/v1/sam/{model}/embed", "/v1/jobs/{job_id}", "/api/function_invocations", "/metrics"} <= {
        t.path for t in templates
    }
    assert unmapped_routes(templates) == []


def test_an_unmapped_route_is_found_and_refused() -> None:
    extra = FastAPI()
    extra.add_api_route("/v1/brand-new", lambda: {}, methods=["PUT"])
    assert unmapped_routes(route_templates(extra.routes)) == ["PUT /v1/brand-new"]
    assert route_scopes("PUT", "/v1/brand-new") is None


def test_the_table_picks_the_most_specific_rule() -> None:
    assert route_scopes("GET", "/v1/cache/stats") == {"interactive", "admin"}
    assert route_scopes("DELETE", "/v1/cache") == {"admin"}
    assert route_scopes("GET", "/v1/cache") is None
    assert route_scopes("GET", "/v1/trackers") == {"interactive"}  # not under the /v1/track prefix
    assert route_scopes("DELETE", "/v1/track/{tracker}/states/{state}") == {"interactive"}
    assert route_scopes("HEAD", "/healthz") == frozenset()
    assert route_scopes("GET", "/v1/jobsxyz") is None
    # The console's page is open, but "/" is no prefix: it opens nothing else.
    assert route_scopes("GET", "/") == route_scopes("GET", "/console/{name}") == frozenset()
    assert route_scopes("GET", "/v1/brand-new") is None and route_scopes("POST", "/") is None


def test_keys_file_changes_are_picked_up(client: TestClient, keys_file: Path) -> None:
    carol = new_key()
    assert client.get("/v1/jobs", headers=bearer(carol)).status_code == 401
    write_keys(keys_file, entry("bob", BOB, "jobs"), entry("carol", carol, "jobs", "interactive"))
    assert client.get("/v1/jobs", headers=bearer(carol)).status_code == 200
    write_keys(keys_file, entry("carol", carol, "jobs", "interactive"))  # bob revoked
    assert client.get("/v1/jobs", headers=bearer(BOB)).status_code == 401
    with keys_file.open("a") as appended:  # in place: same inode, new size
        appended.write(json.dumps(entry("bob", BOB, "jobs")) + "\n")
    assert client.get("/v1/jobs", headers=bearer(BOB)).status_code == 200
    write_keys(keys_file, entry("bob", BOB, "jobs"))


def test_a_broken_keys_file_refuses_its_keys_until_fixed(
    client: TestClient, keys_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys_file.write_text('{"id": "bob", "hash": "sha256:not-hex", "scopes": ["jobs"]}\n')
    with caplog.at_level(logging.ERROR, logger="labelserve.auth"):
        assert client.get("/v1/jobs", headers=bearer(BOB)).status_code == 401
    assert "refused until it is fixed" in caplog.text
    assert client.get("/v1/models", headers=bearer(ALICE)).status_code == 200  # settings keys still work
    keys_file.unlink()
    assert client.get("/v1/jobs", headers=bearer(BOB)).status_code == 401
    write_keys(keys_file, entry("bob", BOB, "jobs"))
    assert client.get("/v1/jobs", headers=bearer(BOB)).status_code == 200


def test_a_bad_keys_file_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "keys.jsonl"
    path.write_text("alice interactive\n")
    with pytest.raises(KeysFileError, match="line 1"):
        create_app(make_settings(tmp_path, models=[], data_dir=tmp_path, api_keys_file=path))
    write_keys(path, entry("alice", ALICE, "jobs"), entry("alice", BOB, "jobs"))
    with pytest.raises(KeysFileError, match="more than once"):
        create_app(make_settings(tmp_path, models=[], data_dir=tmp_path, api_keys_file=path))


def test_the_key_itself_is_stored_nowhere(
    app: FastAPI, client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    settings = app.state.services.settings
    dumps = settings.model_dump_json() + repr(settings) + str(settings.model_dump())
    assert hash_key(ALICE) in dumps
    with caplog.at_level(logging.DEBUG):
        client.get("/v1/models", headers=bearer(ALICE))
        client.get("/v1/jobs", headers=bearer(ALICE))
    logged = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    for text in (dumps, logged):
        assert ALICE not in text and ALICE[4:20] not in text


def test_keys_create_prints_the_key_once_and_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.jsonl"
    assert (
        main(["keys", "create", "--id", "dana", "--scopes", "interactive,jobs", "--append", str(path)]) == 0
    )
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("lsk_") and len(key) > 40 and key not in err
    line = json.loads(path.read_text())
    assert line == {"id": "dana", "hash": hash_key(key), "scopes": ["interactive", "jobs"]}
    assert json.dumps(line, separators=(",", ":")) in err
    assert path.stat().st_mode & 0o777 == 0o600
    assert main(["keys", "create", "--id", "dana", "--scopes", "jobs", "--append", str(path)]) == 2
    assert main(["keys", "create", "--id", "erin", "--scopes", "interactive,superuser"]) == 2
    assert main(["keys", "create", "--id", "bad id", "--scopes", "jobs"]) == 2
    assert len(path.read_text().splitlines()) == 1


# ---- CVAT ------------------------------------------------------------------------------------------------
def test_nuclio_routes_need_a_key_on_the_api_port(client: TestClient) -> None:
    assert client.get("/api/functions").status_code == 401
    assert client.get("/api/functions", headers=bearer(ALICE)).status_code == 200


def test_an_allow_listed_address_calls_nuclio_routes_without_a_key(app: FastAPI) -> None:
    cvat = TestClient(app, client=("10.20.3.4", 40000))
    assert cvat.get("/api/functions").status_code == 200
    assert cvat.get("/v1/models").status_code == 401  # only the Nuclio routes
    outsider = TestClient(app, client=("10.21.3.4", 40000))
    assert outsider.get("/api/functions").status_code == 401


def test_the_cvat_listener_serves_only_nuclio_routes_without_keys(app: FastAPI) -> None:
    listener = CvatListener(app)
    cvat = TestClient(listener, client=("10.20.9.9", 40000))
    assert cvat.get("/api/functions").status_code == 200
    invocation = cvat.post(
        "/api/function_invocations", json={}, headers={"x-nuclio-function-name": "labelserve-nothing"}
    )
    assert invocation.status_code == 404 and invocation.json()["error"]["code"] == "unknown_function"
    assert cvat.get("/healthz").status_code == 200
    for path in ("/v1/models", "/metrics", "/v1/jobs"):
        response = cvat.get(path, headers=bearer(ADMIN))
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", path
    stranger = TestClient(listener, client=("192.0.2.1", 40000))
    response = stranger.get("/api/functions")
    assert response.status_code == 403 and response.json()["error"]["code"] == "address_not_allowed"
    mapped = TestClient(listener, client=("::ffff:10.20.1.1", 40000))  # a dual-stack socket's IPv4 client
    assert mapped.get("/api/functions").status_code == 200


def test_settings_refuse_bad_networks_and_a_shared_port(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        make_settings(tmp_path, cvat_allow_ips="10.0.0.0/8,cvat.internal")
    with pytest.raises(ValueError, match="cvat_port must differ"):
        make_settings(tmp_path, port=8080, cvat_port=8080)
    assert make_settings(tmp_path, cvat_allow_ips="10.0.0.0/8, 192.168.1.7").cvat_allow_ips == [
        "10.0.0.0/8",
        "192.168.1.7",
    ]
