import os
import re
import sys


def run() -> None:
    """``python -m swinlab fit|validate|test|predict|sweep|export ...``: the sweep runner, the ONNX exporter or the
    LightningCLI, all parsed by one construction (``swinlab.cli.build_cli``) and reporting errors alike: swinlab's
    own (a bad config, file or folder) and the system's (``OSError``) in one line and exit status 2, anything else
    (a bug) with its traceback; ``SWINLAB_DEBUG=1`` shows the traceback of every error."""
    try:
        status = _dispatch(sys.argv[1:2])
    except Exception as err:
        if os.environ.get("SWINLAB_DEBUG") == "1" or not _is_reported_in_one_line(err):
            raise
        print(f"swinlab: error: {_explain(err)} (SWINLAB_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)
    sys.exit(status)


def _dispatch(command: list[str]) -> int:
    """Run the command named by ``command`` (``sys.argv[1:2]``); returns the exit status."""
    if command == ["sweep"]:
        from swinlab.sweep import main as sweep

        return sweep(sys.argv[2:])
    if command == ["export"]:
        from swinlab.export import main as export

        del sys.argv[1]  # its parser reads sys.argv[1:], as the LightningCLI's does
        export()
        return 0
    from swinlab.cli import main

    main()
    return 0


def _is_collective_failure(err: BaseException) -> bool:
    """A failed collective (gloo/NCCL): another process died, or did not answer in time."""
    import torch.distributed

    return isinstance(err, torch.distributed.DistError) or "third_party/gloo" in str(err)


def _is_reported_in_one_line(err: BaseException) -> bool:
    """swinlab's own errors (``ConfigError``, ``CheckpointFileError``, ``RunFolderError``, ...: their messages name
    the fix), the system's (``OSError``: a missing file, a full disk) and a failed collective."""
    return isinstance(err, OSError) or type(err).__module__.startswith("swinlab.") or _is_collective_failure(err)


def _explain(err: Exception) -> str:
    """``err`` as one line; a failed collective says so and how to go on, instead of the backend's advice to read
    the other process's log."""
    message = str(err).strip()
    if not _is_collective_failure(err):
        return message or type(err).__name__
    # "[.../gloo/transport/tcp/pair.cc:545] Read error ...: Connection reset by peer. This is typically caused by..."
    reason = re.sub(r"^\[[^\]]*\]\s*", "", message.splitlines()[0] if message else type(err).__name__)
    reason = reason.split(". This is typically")[0]
    return (
        f"another process of this DDP run died, or did not answer within --collective_timeout ({reason}); this one "
        "stopped too. Resume the run with --ckpt_path last"
    )


if __name__ == "__main__":
    run()
