"""One LightningCLI for every task: ``python -m swinlab fit|validate|test|predict --config FILE``."""

from __future__ import annotations

import os
from argparse import RawDescriptionHelpFormatter
from typing import Any

from jsonargparse import DefaultHelpFormatter, set_parsing_settings

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

import swinlab.data
import swinlab.tasks


def _description() -> str:
    """The top-level ``--help`` text: which tasks and data modules the config's ``class_path`` can name."""

    def names(package: Any, base: type) -> str:
        classes = [getattr(package, name) for name in package.__all__]
        found = [c for c in classes if isinstance(c, type) and issubclass(c, base) and c.__name__ != "SwinTask"]
        return "\n".join(f"  {package.__name__}.{c.__name__}" for c in found)

    return (
        "Swin Transformer training with Lightning: classification, detection, segmentation.\n\n"
        f"Tasks (model.class_path):\n{names(swinlab.tasks, LightningModule)}\n"
        f"Data modules (data.class_path):\n{names(swinlab.data, LightningDataModule)}\n\n"
        "Example: python -m swinlab fit --config configs/classification/quickstart_fashion_mnist.yaml\n"
        "Per subcommand: python -m swinlab fit --help; a class's arguments: --model.help CLASS, --data.help CLASS."
    )


class _HelpFormatter(DefaultHelpFormatter, RawDescriptionHelpFormatter):
    """jsonargparse's formatter that keeps the description's line breaks."""


class SwinLabCLI(LightningCLI):
    """LightningCLI with OmegaConf interpolation, class-path model/data selection, and task-owned optimizers.

    Every run gets a ``ModelCheckpoint`` (group ``checkpoint``) writing ``last.ckpt`` and the best checkpoint by
    ``checkpoint.monitor`` into ``<trainer.default_root_dir>/checkpoints`` unless ``checkpoint.dirpath`` is set,
    and a CSV logger unless ``trainer.logger`` names another one.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The link is skipped for tasks without a ``num_classes`` init argument.
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "best-{epoch}-{step}"})
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="fit only: after fitting, run the test loop on the best checkpoint (the final weights if none).",
        )

    def _subcommand_config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        root = config.trainer.default_root_dir or os.getcwd()
        if config.checkpoint.dirpath is None:
            # A fixed folder, so ``--ckpt_path last`` in a later run finds ``last.ckpt``.
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._subcommand_config()
        if config.trainer.logger in (None, True):
            root = config.trainer.default_root_dir or os.getcwd()
            kwargs.setdefault("logger", CSVLogger(save_dir=root))
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        if not self._subcommand_config().test_after_fit:
            return
        checkpoint = self.trainer.checkpoint_callback
        ckpt_path = "best" if checkpoint is not None and checkpoint.best_model_path else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)


def main(args: list[str] | None = None, run: bool = True) -> SwinLabCLI:
    """Run the CLI on ``args`` (``sys.argv[1:]`` when ``None``); tests call it with a list.

    ``run=False`` parses ``args`` without a subcommand and only instantiates trainer, model and data.
    """
    # Subcommands nest the config under ``fit.``/``test.``...; relative paths let configs write ``${data.x}``.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    return SwinLabCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        # ``omegaconf+`` resolves ``${...}`` after all configs and command-line overrides are merged, so a value
        # such as the image size is set once, and overriding it on the command line reaches every use.
        parser_kwargs={"parser_mode": "omegaconf+", "description": _description(), "formatter_class": _HelpFormatter},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
