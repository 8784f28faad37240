import os
import re
import sys


def run() -> None:
    """``python -m swinlab sweep|export ...`` go to the sweep runner and the ONNX exporter, anything else to the
    LightningCLI."""
    if sys.argv[1:2] == ["sweep"]:
        from swinlab.sweep import main as sweep

        sys.exit(sweep(sys.argv[2:]))
    if sys.argv[1:2] == ["export"]:
        from swinlab.export import main as export

        del sys.argv[1]  # its parser reads sys.argv[1:], as the LightningCLI's does
        export()
        return
    from swinlab.cli import main

    try:
        main()
    except Exception as err:
        # A bad config, file or folder gets one line naming it; the traceback only on request.
        if os.environ.get("SWINLAB_DEBUG") == "1":
            raise
        print(f"swinlab: error: {_explain(err)} (SWINLAB_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)


def _explain(err: Exception) -> str:
    """``err`` as one line; a failed collective (gloo/NCCL: another process died, or timed out) says so and how to
    go on, instead of the backend's advice to read the other process's log."""
    import torch.distributed

    message = str(err).strip()
    if not (isinstance(err, torch.distributed.DistError) or "third_party/gloo" in message):
        return message
    # "[.../gloo/transport/tcp/pair.cc:545] Read error ...: Connection reset by peer. This is typically caused by..."
    reason = re.sub(r"^\[[^\]]*\]\s*", "", message.splitlines()[0] if message else type(err).__name__)
    reason = reason.split(". This is typically")[0]
    return (
        f"another process of this DDP run died, or did not answer within --collective_timeout ({reason}); this one "
        "stopped too. Resume the run with --ckpt_path last"
    )


if __name__ == "__main__":
    run()
