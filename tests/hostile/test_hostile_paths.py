"""Hostile paths (issue 12, items 1 and 4): check-then-open races, NUL bytes, symlink loops, special files,
traversal. Each refusal is a typed error and a normal load works right after."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from hd4k_tools import ImagePolicy, errors, load_image
from hd4k_tools.inputs.images import read_source_bytes

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX paths, FIFOs and O_NOFOLLOW")


def _swap_on_first_open(monkeypatch: pytest.MonkeyPatch, swap: Callable[[], None], match: str | None = None) -> None:
    """Run ``swap`` in the window between a reader's checks and its open: just before its first open,
    or (without ``match``) before its second ``os.stat`` of ``inner.png`` (a reader that resolves with ``Path.resolve``,
    which stats once, then stats what it will open)."""
    done: list[bool] = []
    stats: list[bool] = []
    real_stat, real_open, real_io_open = os.stat, os.open, io.open

    def maybe_swap(path: object) -> None:
        if done:
            return
        if match is None or (isinstance(path, str | os.PathLike) and os.fspath(path).endswith(match)):
            done.append(True)
            swap()

    def stat(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if match is None and os.fspath(path).endswith("inner.png"):
            stats.append(True)
            if len(stats) >= 2:
                maybe_swap(path)
        return real_stat(path, *args, **kwargs)

    def open_(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        maybe_swap(path)
        return real_open(path, *args, **kwargs)

    def io_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        maybe_swap(path)
        return real_io_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(io, "open", io_open)


def _run_bounded(call: Callable[[], object], unblock: Callable[[], None], seconds: float = 5.0) -> BaseException | None:
    """Run ``call`` in a thread; fail if it has not returned after ``seconds`` (then ``unblock`` it)."""
    box: list[BaseException | None] = []

    def work() -> None:
        try:
            call()
            box.append(None)
        except BaseException as err:
            box.append(err)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        unblock()
        worker.join(5)
        pytest.fail(f"the read blocked for more than {seconds} s")
    return box[0]


# ----------------------------------------------------------------------------------------------------
# Races (item 1)
# ----------------------------------------------------------------------------------------------------
def test_folder_swapped_for_symlink_to_outside_is_not_read(
    root: Path, outside: Path, monkeypatch: pytest.MonkeyPatch, healthy_load: Callable[[], None]
) -> None:
    def swap() -> None:
        (root / "sub").rename(root / "sub-moved")
        (root / "sub").symlink_to(outside, target_is_directory=True)

    _swap_on_first_open(monkeypatch, swap)
    with pytest.raises(errors.PathNotAllowedError, match="symlink"):
        read_source_bytes(root / "sub" / "inner.png", policy=ImagePolicy(allowed_roots=(root,)))
    monkeypatch.undo()
    healthy_load()


def test_file_swapped_for_symlink_to_outside_is_not_read(
    root: Path, outside: Path, monkeypatch: pytest.MonkeyPatch, healthy_load: Callable[[], None]
) -> None:
    target = root / "sub" / "inner.png"

    def swap() -> None:
        target.unlink()
        target.symlink_to(outside / "secret.png")

    _swap_on_first_open(monkeypatch, swap)
    with pytest.raises(errors.PathNotAllowedError):
        read_source_bytes(target, policy=ImagePolicy(allowed_roots=(root,)))
    monkeypatch.undo()
    healthy_load()


@pytest.mark.parametrize("with_root", [True, False], ids=["root", "no-root"])
def test_file_swapped_for_fifo_between_stat_and_open_does_not_block(
    root: Path, monkeypatch: pytest.MonkeyPatch, with_root: bool, healthy_load: Callable[[], None]
) -> None:
    victim = root / "victim.png"
    victim.write_bytes((root / "good.png").read_bytes())

    def swap() -> None:
        victim.unlink()
        os.mkfifo(victim)

    def unblock() -> None:  # give a blocked reader its writer, so the thread ends
        fd = os.open(victim, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)

    _swap_on_first_open(monkeypatch, swap, match="victim.png")
    policy = ImagePolicy(allowed_roots=(root,) if with_root else None)
    err = _run_bounded(lambda: read_source_bytes(victim, policy=policy), unblock)
    monkeypatch.undo()
    assert isinstance(err, errors.ImageNotFoundError) and "not a regular file" in str(err)
    healthy_load()


# ----------------------------------------------------------------------------------------------------
# Bad paths (item 4 and the classic ones, each a typed error)
# ----------------------------------------------------------------------------------------------------
def _fifo(root: Path) -> Path:
    os.mkfifo(root / "pipe.png")
    return root / "pipe.png"


def _loop(root: Path) -> Path:
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    return root / "loop-a"


def _dir_loop(root: Path) -> Path:
    (root / "d1").symlink_to(root / "d2")
    (root / "d2").symlink_to(root / "d1")
    return root / "d1" / "x.png"


def _escape_link(root: Path) -> Path:
    (root / "escape.png").symlink_to("/etc/hostname")
    return root / "escape.png"


def _escape_dir(root: Path) -> Path:
    (root / "etc").symlink_to("/etc")
    return root / "etc" / "hostname"


def _empty(root: Path) -> Path:
    (root / "empty.png").write_bytes(b"")
    return root / "empty.png"


BAD_PATHS: list[tuple[str, Callable[[Path], object], type[Exception]]] = [
    ("nul-in-name", lambda r: str(r / "good.png\x00.txt"), errors.ImageNotFoundError),
    ("nul-only", lambda r: "\x00", errors.ImageNotFoundError),
    ("nul-in-dir", lambda r: str(r / "su\x00b" / "inner.png"), errors.InputError),
    ("nul-pathlike", lambda r: r / "a\x00b.png", errors.ImageNotFoundError),
    ("symlink-loop", _loop, errors.InputError),
    ("dir-symlink-loop", _dir_loop, errors.InputError),
    ("fifo", _fifo, errors.ImageNotFoundError),
    ("directory", lambda r: r / "sub", errors.ImageNotFoundError),
    ("root-itself", lambda r: r, errors.ImageNotFoundError),
    ("missing", lambda r: r / "nope.png", errors.ImageNotFoundError),
    ("empty", _empty, errors.EmptyInputError),
    ("dotdot", lambda r: str(r / ".." / "outside" / "secret.png"), errors.PathNotAllowedError),
    ("dotdot-deep", lambda r: str(r / "sub" / ".." / ".." / ".." / "etc" / "passwd"), errors.PathNotAllowedError),
    ("absolute-outside", lambda r: "/etc/passwd", errors.PathNotAllowedError),
    ("dev-zero", lambda r: "/dev/zero", errors.PathNotAllowedError),
    ("proc-self-mem", lambda r: "/proc/self/mem", errors.PathNotAllowedError),
    ("symlink-escape-file", _escape_link, errors.PathNotAllowedError),
    ("symlink-escape-dir", _escape_dir, errors.PathNotAllowedError),
    ("home-tilde", lambda r: "~/../../etc/passwd", errors.PathNotAllowedError),
    ("very-long-name", lambda r: str(r / ("a" * 5000 + ".png")), errors.ImageNotFoundError),
    ("very-deep", lambda r: str(r / "/".join(["x"] * 3000)), errors.InputError),
]


@pytest.mark.parametrize(("make", "error"), [(m, e) for _, m, e in BAD_PATHS], ids=[n for n, _, _ in BAD_PATHS])
def test_bad_path_under_root_is_typed(
    root: Path, make: Callable[[Path], object], error: type[Exception], healthy_load: Callable[[], None]
) -> None:
    source = make(root)
    with pytest.raises(error):
        load_image(source, policy=ImagePolicy(allowed_roots=(root,)))  # type: ignore[arg-type]
    healthy_load()


NO_ROOT_PATHS = [
    ("nul", lambda r: str(r / "good.png\x00"), errors.ImageNotFoundError),
    ("loop", _loop, errors.InputError),
    ("dir-loop", _dir_loop, errors.InputError),
    ("fifo", _fifo, errors.ImageNotFoundError),
    ("dev-zero", lambda r: "/dev/zero", errors.ImageNotFoundError),
    ("dev-null", lambda r: "/dev/null", errors.ImageNotFoundError),
    ("proc-dir", lambda r: "/proc/self", errors.ImageNotFoundError),
    ("too-long", lambda r: "x" * 100_000, errors.InputError),
    ("too-long-path", lambda r: "/" + "x/" * 50_000 + "a.png", errors.InputError),
]


@pytest.mark.parametrize(("make", "error"), [(m, e) for _, m, e in NO_ROOT_PATHS], ids=[n for n, _, _ in NO_ROOT_PATHS])
def test_bad_path_without_root_is_typed(
    root: Path, make: Callable[[Path], object], error: type[Exception], healthy_load: Callable[[], None]
) -> None:
    with pytest.raises(error):
        load_image(make(root))  # type: ignore[arg-type]
    healthy_load()


def test_symlink_inside_root_still_works(root: Path) -> None:
    (root / "alias.png").symlink_to(root / "sub" / "inner.png")
    assert load_image(root / "alias.png", policy=ImagePolicy(allowed_roots=(root,))).size == (40, 30)


def test_file_over_max_bytes_is_refused_from_the_descriptor(root: Path) -> None:
    with pytest.raises(errors.FileTooLargeError):
        load_image(root / "good.png", policy=ImagePolicy(allowed_roots=(root,), max_bytes=10))
