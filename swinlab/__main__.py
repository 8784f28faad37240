import os
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
        print(f"swinlab: error: {err} (SWINLAB_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
