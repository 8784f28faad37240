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

    main()


if __name__ == "__main__":
    run()
