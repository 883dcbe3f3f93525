"""`latentdiff serve` on a shared machine (issue #28): what the page serves, and who may use it.

Each test talks to a real server on 127.0.0.1 over HTTP (httpx and gradio's own client), as a
browser or another local account would.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import threading
from pathlib import Path

import pytest
from PIL import Image

from latentdiff.core.errors import UserError
from latentdiff.scripts import cli

pytest.importorskip("gradio", reason="latentdiff serve needs gradio: pip install -e '.[serve]' (make setup does)")

import httpx  # noqa: E402  (gradio's dependency)
from gradio_client import Client  # noqa: E402

from latentdiff.serve import runs  # noqa: E402
from latentdiff.serve.access import Access, parse_size, read_auth_file  # noqa: E402
from latentdiff.serve.app import exposure_warning, start  # noqa: E402

USER = ("ann", "correct horse battery staple")
FORM = ["a red circle", "", "ddim", 2, 2.0, 0, 1, None, None, 0.75, 0.0, "all"]  # the Generate tab's fields


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fn_index(server, name: str) -> int:
    return next(i for i, fn in server.blocks.fns.items() if fn.name == name)


def _file_url(server, path: str | Path) -> str:
    return f"{server.url}gradio_api/file={path}"


def _paths(value) -> list[str]:
    """The files a handler hands Gradio to serve: paths in its components' updates (galleries of (path, caption)).

    summary.json is shown as JSON text, so a path inside it is text, not a served file.
    """
    if isinstance(value, str):
        return [value] if Path(value).is_absolute() and Path(value).is_file() else []
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths(v)] if value.get("__type__") == "update" else []
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths(v)]
    return []


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """The working directory and the system temp folder away from the runs, as after `cd / && latentdiff serve
    --run ~/x/runs/prior` (Gradio serves files from those two folders only)."""
    cwd, temp = tmp_path / "cwd", tmp_path / "temp"
    cwd.mkdir()
    temp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return cwd, temp


@pytest.fixture
def serve(prior_run, pipe):
    """start() on a free port with the session's tiny prior; every server is closed after the test."""
    servers = []

    def _start(**kw):
        servers.append(start(prior_run[0], port=_free_port(), pipe=pipe, device="cpu", quiet=True, **kw))
        return servers[-1]

    yield _start
    for server in servers:
        server.close()


def test_runs_tab_serves_copies_for_a_run_outside_the_working_and_temp_folders(
    serve, elsewhere, prior_run, ae_run, text_run
):
    stages = [prior_run[0], ae_run[0], text_run[0]]
    assert not any(p.is_relative_to(folder) for p in stages for folder in elsewhere)
    server = serve()
    # What the page's handler hands Gradio: copies in the server's own folder, none inside a run.
    show = server.blocks.fns[_fn_index(server, "show")].fn
    served = _paths(show())
    assert any(Path(p).name == "samples.png" for p in served) and any("reconstructions" in p for p in served)
    for path in served:
        assert Path(path).is_relative_to(server.out_dir), path
        assert not any(Path(path).is_relative_to(run) for run in stages), path
    source = prior_run[0] / "samples.png"
    [copy] = [p for p in served if Path(p).name == "samples.png"]
    assert Path(copy).read_bytes() == source.read_bytes()

    # Through HTTP, as the browser loads the tab: no refusal, and the grid comes back byte for byte.
    client = Client(server.url, verbose=False, download_files=False)
    values = client.predict(fn_index=_fn_index(server, "show"))
    prior_grids = values[3]["value"]
    assert [g["caption"] for g in prior_grids] == ["samples"]
    url = prior_grids[0]["image"]["url"]
    assert str(prior_run[0]) not in url
    assert httpx.get(url).content == source.read_bytes()

    # The run folder itself is never served: its weights and config are refused by path.
    for secret in [*prior_run[0].rglob("*.safetensors"), prior_run[0] / "config.toml"]:
        assert httpx.get(_file_url(server, secret)).status_code == 403, secret


def test_copies_follow_a_training_run_and_stale_ones_are_removed(tmp_path):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "eval").mkdir()
    (run / "eval" / "report.json").write_text("{}")
    (run / "eval" / "report.md").write_text("| guidance | FID |")
    Image.new("RGB", (8, 8), "red").save(run / "eval" / "tradeoff.png")
    Image.new("RGB", (8, 8), "red").save(run / "samples" / "step_0000010.png")
    (run / "model.safetensors").write_bytes(b"weights")
    copies = runs.Copies(tmp_path / "served")

    first = runs.view(runs.Stage("prior", run), copies)
    copies.prune()
    [(grid, caption)] = first.grids
    [(_, plot)] = first.reports
    assert caption == "step 0000010"
    for path in (grid, plot):
        assert Path(path).is_relative_to(tmp_path / "served") and not Path(path).is_relative_to(run)
    assert Path(grid).read_bytes() == (run / "samples" / "step_0000010.png").read_bytes()
    assert not list((tmp_path / "served").rglob("*.safetensors"))

    # The run writes on: a rewritten grid is copied again, a new one appears, a deleted one goes.
    Image.new("RGB", (8, 8), "blue").save(run / "samples" / "step_0000010.png")
    os.utime(run / "samples" / "step_0000010.png", ns=(1, 1))  # another mtime whatever the clock's resolution
    Image.new("RGB", (8, 8), "green").save(run / "samples" / "step_0000020.png")
    (run / "eval" / "tradeoff.png").unlink()
    second = runs.view(runs.Stage("prior", run), copies)
    copies.prune()
    assert [c for _, c in second.grids] == ["step 0000010", "step 0000020"]
    assert Path(second.grids[0][0]).read_bytes() == (run / "samples" / "step_0000010.png").read_bytes()
    assert second.reports[0][1] is None
    assert not Path(grid).exists() and not Path(plot).exists()  # the stale copies were removed
    served = sorted(p for p in (tmp_path / "served").rglob("*") if p.is_file())
    assert served == sorted(Path(p) for p, _ in second.grids)


def test_a_login_is_required_when_auth_is_given(serve):
    server = serve(access=Access(users=(USER,)))
    index = _fn_index(server, "show")
    join = {"data": [], "fn_index": index, "session_hash": "nobody", "event_data": None, "trigger_id": None}
    with httpx.Client(base_url=server.url) as anonymous:
        assert anonymous.get("config").status_code == 401
        assert anonymous.post("gradio_api/queue/join", json=join).status_code == 401
        assert anonymous.post("gradio_api/upload", files={"files": ("a.png", b"x")}).status_code == 401
        assert anonymous.post("login", data={"username": USER[0], "password": "wrong"}).status_code == 400
    with httpx.Client(base_url=server.url) as ann:
        assert ann.post("login", data={"username": USER[0], "password": USER[1]}).status_code == 200
        assert ann.get("config").status_code == 200
    values = Client(server.url, auth=USER, verbose=False, download_files=False).predict(fn_index=index)
    assert values[3]["value"][0]["caption"] == "samples"
    assert "password" not in repr(Access(users=(USER,))) and USER[1] not in repr(Access(users=(USER,)))


def test_upload_and_queue_limits_are_enforced(serve):
    server = serve(access=Access(max_queue=1, max_upload=1024))
    with httpx.Client(base_url=server.url) as page:
        assert page.post("gradio_api/upload", files={"files": ("a.png", b"x" * 2048)}).status_code == 413
        assert page.post("gradio_api/upload", files={"files": ("a.png", b"x" * 512)}).status_code == 200

    # One request sampling (held here), one waiting: the queue is full and a third is refused at once.
    entered, release = threading.Event(), threading.Event()

    def held(*form, **kw):
        entered.set()
        release.wait(60)
        raise UserError("released")

    server.generator.generate = held
    index = _fn_index(server, "run")

    def join(session):
        body = {"data": FORM, "fn_index": index, "session_hash": session, "event_data": None, "trigger_id": None}
        return httpx.post(f"{server.url}gradio_api/queue/join", json=body)

    try:
        assert join("first").status_code == 200
        assert entered.wait(60)
        assert join("second").status_code == 200
        third = join("third")
        assert third.status_code == 503 and "Queue is full" in third.text
    finally:
        release.set()


def test_served_files_are_readable_by_this_account_only(serve, prior_run, tmp_path):
    server = serve()
    values = Client(server.url, verbose=False, download_files=False).predict(fn_index=_fn_index(server, "show"))
    cached = Path(values[3]["value"][0]["image"]["path"])  # Gradio's own copy, the file the browser gets
    assert cached.is_file() and not cached.is_relative_to(prior_run[0])
    private = [p for p in cached.parents if p.is_dir() and stat.S_IMODE(p.stat().st_mode) & 0o077 == 0]
    assert private and private[0] != Path("/"), f"{cached}: some folder above it must be closed to other accounts"
    assert stat.S_IMODE(server.out_dir.stat().st_mode) & 0o077 == 0


@pytest.mark.parametrize(
    "text, size",
    [("20MB", 20 * 2**20), ("512kb", 512 * 2**10), ("1 GB", 2**30), ("4096", 4096), ("2.5MB", int(2.5 * 2**20))],
)
def test_upload_sizes_read_as_gradio_counts_them(text, size):
    assert parse_size(text, "--max-upload") == size


@pytest.mark.parametrize("text", ["", "lots", "-1MB", "0", "0KB", "10 parsecs", "nanMB", "infGB"])
def test_bad_upload_sizes_are_one_line_errors(text):
    with pytest.raises(UserError, match=r"^--max-upload must be a size such as 20MB") as e:
        parse_size(text, "--max-upload")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(max_queue=0), "max_queue must be a whole number >= 1, got 0"),
        (dict(max_upload=0), "max_upload must be a whole number of bytes >= 1, got 0"),
        (dict(users=(("", "pw"),)), "a user name must be non-empty"),
        (dict(users=(("ann", ""),)), "the password of ann is empty"),
        (dict(users=((" ann", "pw"),)), "a user name must be non-empty, without spaces around it"),
        (dict(users=(("ann", "a"), ("ann", "b"))), "user ann is given twice"),
    ],
)
def test_bad_access_settings_are_one_line_errors(kw, message):
    with pytest.raises(UserError, match="^" + message) as e:
        Access(**kw)
    assert "\n" not in str(e.value)


def test_auth_file_is_read_and_must_be_private(tmp_path):
    path = tmp_path / "auth"
    path.write_text("# who may use the page\nann:pa:ss word\n\nbob:x\r\n", encoding="utf-8")
    path.chmod(0o600)
    assert read_auth_file(path) == (("ann", "pa:ss word"), ("bob", "x"))
    path.chmod(0o640)
    with pytest.raises(UserError, match=r"can be read by other accounts \(mode 0640\); run chmod 600 "):
        read_auth_file(path)
    path.chmod(0o600)
    for text, message in [
        ("ann\n", "line 1 is not USER:PASSWORD"),
        ("# nothing\n", "holds no USER:PASSWORD line"),
        ("ann:x\nann:y\n", "user ann is given twice"),
    ]:
        path.write_text(text, encoding="utf-8")
        with pytest.raises(UserError, match=message) as e:
            read_auth_file(path)
        assert "\n" not in str(e.value) and ":y" not in str(e.value)  # never a password in a message
    path.write_bytes(b"ann:\xff\n")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        read_auth_file(path)
    with pytest.raises(UserError, match="does not exist"):
        read_auth_file(tmp_path / "nowhere")


def test_serve_flags_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    secret = "hunter2-secret"
    cases = [
        (["--auth", "ann"], "--auth must be USER:PASSWORD"),
        (["--auth", f":{secret}"], "a user name must be non-empty"),
        (["--max-queue", "0"], "max_queue must be a whole number >= 1, got 0"),
        (["--max-upload", "lots"], "--max-upload must be a size such as 20MB"),
        (["--auth-file", str(tmp_path / "none")], "does not exist"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as exc:
            cli.main(["serve", "--run", str(tmp_path / "nowhere"), *flags])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and "nowhere" not in err and secret not in err, err
    with pytest.raises(SystemExit):
        cli.main(["serve", "--run", "x", "--auth", "a:b", "--auth-file", "f"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_exposure_warning_says_what_the_address_and_the_login_protect():
    assert exposure_warning("127.0.0.1", login=False) is None and exposure_warning("::1", login=True) is None
    assert "no password" in exposure_warning("0.0.0.0", login=False)
    assert "without encryption" in exposure_warning("0.0.0.0", login=True)
