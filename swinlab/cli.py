"""One LightningCLI for every task: ``python -m swinlab fit|validate|test|predict --config FILE``.

:func:`build_cli` is the one construction every command shares (``export`` through its subclass of
:class:`SwinLabCLI`): ``__base__`` composition, parser settings (``omegaconf+`` interpolation, no abbreviations),
unknown keys as one ``ConfigError``. The fit-only arguments are one group (:func:`add_fit_arguments`) that only
``fit`` adds; a config file's values for them are dropped for the other commands, so one recipe serves them all.
"""

from __future__ import annotations

import os
import sys
from argparse import RawDescriptionHelpFormatter
from datetime import timedelta
from typing import Any, Literal

from jsonargparse import ArgumentError, DefaultHelpFormatter, set_parsing_settings
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_only

import swinlab.data
import swinlab.tasks
from swinlab.callbacks import NonFiniteLossGuard, PreemptionCheckpoint, ResumePosition
from swinlab.checkpointing import AtomicCheckpointIO, RunFolderLock, check_fresh_run_folder
from swinlab.config_compose import expand_command_line
from swinlab.data.bad_samples import BadSampleReport
from swinlab.plots import TrainingCurves
from swinlab.tasks.base import batch_size
from swinlab.validation import (
    ConfigError,
    check_checkpoint_matches,
    check_checkpoint_task,
    check_num_classes,
    explain_parse_error,
    requested_num_classes,
    validate_run_config,
)


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


def _as_list(value: Any) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


SUBCOMMANDS = ("fit", "validate", "test", "predict")
# The arguments of add_fit_arguments: a config file may set them (a recipe serves every command), other commands
# drop them from it.
FIT_ONLY_KEYS = (
    "overwrite",
    "collective_timeout",
    "checkpoint_every_n_steps",
    "checkpoint_every_minutes",
    "test_after_fit",
)


def _subcommand_in(args: Any) -> str | None:
    """The subcommand named in ``args`` (``sys.argv[1:]`` when None), or None."""
    return next((arg for arg in args or sys.argv[1:] if arg in SUBCOMMANDS), None)


def _subcommand_parser(parser: LightningArgumentParser, args: Any) -> LightningArgumentParser:
    """The parser of the subcommand named in ``args`` (the root parser when none is)."""
    subcommand = _subcommand_in(args)
    for action in parser._actions:
        if isinstance(action.choices, dict) and subcommand in action.choices:
            return action.choices[subcommand]
    return parser


class _HelpFormatter(DefaultHelpFormatter, RawDescriptionHelpFormatter):
    """jsonargparse's formatter that keeps the description's line breaks."""


def add_fit_arguments(parser: LightningArgumentParser) -> None:
    """The arguments only ``fit`` has (:data:`FIT_ONLY_KEYS`), as one group."""
    group = parser.add_argument_group("fit only", "Checkpoint timing, run folder and DDP settings of a fit.")
    group.add_argument(
        "--checkpoint_every_n_steps",
        type=int | None,
        default=None,
        help="also refresh last.ckpt every N optimizer steps (mid-epoch), so a killed run loses at most N steps; "
        "replaces checkpoint_every_minutes.",
    )
    group.add_argument(
        "--checkpoint_every_minutes",
        type=float | None,
        default=30.0,
        help="also refresh last.ckpt every this many minutes of training (null: off).",
    )
    group.add_argument(
        "--overwrite",
        type=bool,
        default=False,
        help="start a new run even though the checkpoint folder holds a run's checkpoints (deleted first). Without "
        "it such a fit refuses to start; resume it with --ckpt_path last instead.",
    )
    group.add_argument(
        "--collective_timeout",
        type=float,
        default=600.0,
        help="DDP: seconds a collective (gradient all-reduce, barrier) waits for the other processes before failing, "
        "so a dead process stops the run instead of hanging it.",
    )
    group.add_argument(
        "--test_after_fit",
        type=bool,
        default=False,
        help="after fitting, run the test loop on the best checkpoint (the final weights if none).",
    )


def add_model_file_arguments(parser: LightningArgumentParser) -> None:
    """``--model_file``: validate, test or predict with an exported model instead of the PyTorch network."""
    group = parser.add_argument_group("exported model", "Run a file written by `python -m swinlab export`.")
    group.add_argument(
        "--model_file",
        type=str | None,
        default=None,
        help="an exported model (.onnx, or OpenVINO .xml) that runs in place of the network; the config still "
        "gives the task, its data and its post-processing, the file gives the weights (no --ckpt_path)",
    )
    group.add_argument(
        "--runtime",
        type=Literal["onnxruntime", "openvino"] | None,
        default=None,
        help="the CPU runtime that runs --model_file (default: openvino for .xml, onnxruntime for .onnx)",
    )


class SwinLabCLI(LightningCLI):
    """LightningCLI with OmegaConf interpolation, class-path model/data selection, and task-owned optimizers.

    Every run gets a ``ModelCheckpoint`` (group ``checkpoint``) writing ``last.ckpt`` and the best checkpoint by
    ``checkpoint.monitor`` into ``<trainer.default_root_dir>/checkpoints`` unless ``checkpoint.dirpath`` is set,
    TensorBoard and CSV loggers writing into the same ``lightning_logs/version_N`` folder unless ``trainer.logger``
    names others (docs/tracking.md), the pictures of ``swinlab.plots`` (training curves after ``fit``,
    evaluation pictures after ``validate``/``test``) and, in ``fit``, a ``ThroughputMonitor`` (images/s, FLOP/s).

    Reliability (see docs/reliability.md): the config is checked before anything is built
    (``swinlab.validation``); checkpoints are saved atomically and loaded with ``weights_only=True``
    (``AtomicCheckpointIO``); ``last.ckpt`` is also refreshed every ``checkpoint_every_n_steps`` steps or
    ``checkpoint_every_minutes`` minutes and on SIGTERM; non-finite losses skip their step (group ``non_finite``).

    Built with ``run=False`` it parses and builds as the command :attr:`command` (``fit``: its arguments too).
    """

    command = "fit"

    @property
    def running_command(self) -> str:
        """The subcommand being run, else :attr:`command`."""
        return self.subcommand or self.command

    _parser_command: str | None = None  # the subcommand whose parser is being set up (None: the root parser's)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        self._parser_command = subcommand  # for add_arguments_to_parser, which LightningCLI calls from here
        return super()._prepare_subcommand_parser(klass, subcommand, **kwargs)

    def add_command_arguments(self, parser: LightningArgumentParser, command: str) -> None:
        """The arguments of one command, after those all commands share (:meth:`add_arguments_to_parser`)."""
        if command == "fit":
            add_fit_arguments(parser)
        elif command in ("validate", "test", "predict"):
            add_model_file_arguments(parser)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The link is skipped for tasks without a ``num_classes`` init argument.
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # No version counter: ``last.ckpt`` is overwritten (atomically), never joined by ``last-v1.ckpt``, so
        # ``--ckpt_path last`` and the periodic saves below always mean the same file.
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch}-{step}",
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(NonFiniteLossGuard, "non_finite")
        self.add_command_arguments(parser, self._parser_command or self.command)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, turning an unknown key into a ``ConfigError`` naming the closest valid keys, and check a
        ``--ckpt_path`` file before LightningCLI applies its hyper-parameters to the model config."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ConfigError(explain_parse_error(str(err), _subcommand_parser(parser, args))) from None
        config = self.config.get(self.config.get("subcommand") or "", self.config)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path not in (None, "last", "best", "hpc", "registry") and "://" not in str(ckpt_path):
            check_checkpoint_task(ckpt_path, config.model)

    def _subcommand_config(self, config: Any = None) -> Any:
        """The part of ``config`` (default: the parsed ``self.config``) for the running subcommand."""
        config = self.config if config is None else config
        return config[self.subcommand] if self.subcommand else config

    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        root = config.trainer.default_root_dir or os.getcwd()
        if config.checkpoint.dirpath is None:
            # A fixed folder, so ``--ckpt_path last`` in a later run finds ``last.ckpt``.
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        validate_run_config(config, self.subcommand)
        if config.get("model_file") is not None:
            if config.get("ckpt_path") is not None:
                raise ConfigError(
                    f"--model_file {config.model_file} holds the weights: drop --ckpt_path {config.ckpt_path}"
                )
            if "pretrained" in (config.model.get("init_args") or {}):
                config.model.init_args.pretrained = None  # the file's weights replace them
        self._run_lock = RunFolderLock(root)
        self._requested_num_classes = requested_num_classes(config)

    def instantiate_classes(self) -> None:
        """LightningCLI's, where a class refusing a value of the config (a ``ValueError`` of its constructor, such as
        ``image_size must be >= 1``) is a ``ConfigError``: reported in one line."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            if type(err).__module__.startswith("swinlab."):
                raise  # already one of swinlab's own errors
            raise ConfigError(str(err)) from err

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._subcommand_config()
        if config.trainer.logger in (None, True):
            root = config.trainer.default_root_dir or os.getcwd()
            csv_logger = CSVLogger(save_dir=root)
            # One version folder for both: the CSV logger picks the next free version_N, TensorBoard takes it. The
            # CSV logger goes first, so it creates the folder (it warns about a folder that is already there).
            kwargs.setdefault("logger", [csv_logger, TensorBoardLogger(save_dir=root, version=csv_logger.version)])
        trainer_init = self._subcommand_config(self.config_init).get("trainer") or {}
        plugins = _as_list(kwargs.get("plugins", trainer_init.get("plugins")))
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        strategy = kwargs.get("strategy", trainer_init.get("strategy"))
        # A dead process makes the others fail after collective_timeout instead of waiting forever in a collective.
        entry = StrategyRegistry[strategy] if isinstance(strategy, str) and strategy in StrategyRegistry else None
        if entry is not None and issubclass(entry["strategy"], DDPStrategy) and "collective_timeout" in config:
            timeout = timedelta(seconds=config.collective_timeout)
            kwargs["strategy"] = entry["strategy"](**{**entry["init_params"], "timeout": timeout})
        resume_checkpoints = self._resume_checkpoint()
        extra = [ResumePosition(), PreemptionCheckpoint(), BadSampleReport(), *resume_checkpoints, *self._observers()]
        if self.subcommand == "fit":
            extra.append(self._run_lock)  # released by the trainer on an exception
        kwargs["callbacks"] = [*_as_list(kwargs.get("callbacks", trainer_init.get("callbacks"))), *extra]
        trainer = super().instantiate_trainer(**kwargs)
        # ``trainer.checkpoint_callback`` (what ``best`` and ``test_after_fit`` use) is the first ModelCheckpoint:
        # keep the monitored one from the ``checkpoint`` group ahead of the periodic last-only one.
        others = [callback for callback in trainer.callbacks if callback not in resume_checkpoints]
        trainer.callbacks = others + resume_checkpoints
        return trainer

    def _observers(self) -> list[Callback]:
        """Pictures (``swinlab.plots``) on every run; in ``fit`` also throughput over the batches between two log
        lines (``SwinTask.flops_per_batch`` adds FLOP/s, and utilisation where Lightning knows the device's peak)."""
        observers: list[Callback] = [TrainingCurves()]
        if self.running_command == "fit":
            window = (self._subcommand_config().trainer.log_every_n_steps or 50) + 1
            observers.append(ThroughputMonitor(batch_size_fn=batch_size, window_size=window))
        return observers

    def _resume_checkpoint(self) -> list[ModelCheckpoint]:
        """A second ``ModelCheckpoint`` refreshing only ``last.ckpt`` in the same folder, every N steps or minutes."""
        config = self._subcommand_config()
        if self.running_command != "fit":
            return []
        steps, minutes = config.checkpoint_every_n_steps, config.checkpoint_every_minutes
        if steps is None and minutes is None:
            return []
        for name, value in (("checkpoint_every_n_steps", steps), ("checkpoint_every_minutes", minutes)):
            if value is not None and value <= 0:
                raise ConfigError(f"{name}={value} must be > 0 or null (off)")
        interval = {"every_n_train_steps": steps} if steps else {"train_time_interval": timedelta(minutes=minutes)}
        return [
            ModelCheckpoint(
                dirpath=config.checkpoint.dirpath,
                save_top_k=0,
                save_last=True,
                enable_version_counter=False,
                **interval,
            )
        ]

    def _check_before_run(self) -> None:
        # The checkpoint first: LightningCLI copies its hyper-parameters (num_classes too) into the config.
        ckpt_path = self._subcommand_config().get("ckpt_path")
        if ckpt_path not in (None, "last", "best", "hpc", "registry") and "://" not in str(ckpt_path):
            check_checkpoint_matches(ckpt_path, self.model, self.datamodule)
        check_num_classes(self.model, self.datamodule, self._requested_num_classes)
        model_file = self._subcommand_config().get("model_file")
        if model_file is not None:
            from swinlab.deploy.runtime import ExportedModel

            self.model.use_exported(ExportedModel(model_file, runtime=self._subcommand_config().runtime))

    def before_fit(self) -> None:
        """One fit at a time per run folder: rank 0 (before it starts the other DDP processes) takes the folder's
        lock, then refuses a fresh fit into a folder that holds a run's checkpoints (``--overwrite true`` deletes
        them, which is safe only once the lock is held). ``after_fit`` or, on an exception, the trainer releases it."""
        self._check_before_run()
        config = self._subcommand_config()
        if rank_zero_only.rank != 0:
            return
        self._run_lock.acquire()
        try:
            if config.get("ckpt_path") is None:
                check_fresh_run_folder(config.checkpoint.dirpath, config.overwrite)
        except BaseException:
            self._run_lock.release()
            raise

    def before_validate(self) -> None:
        self._check_before_run()

    def before_test(self) -> None:
        self._check_before_run()

    def before_predict(self) -> None:
        self._check_before_run()

    def after_fit(self) -> None:
        try:
            if self._subcommand_config().test_after_fit:
                checkpoint = self.trainer.checkpoint_callback
                ckpt_path = "best" if checkpoint is not None and checkpoint.best_model_path else None
                self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)
        finally:
            self._run_lock.release()


def build_cli(
    cli_class: type[SwinLabCLI], args: list[str] | None, run: bool = True, **parser_kwargs: Any
) -> SwinLabCLI:
    """``cli_class`` on ``args`` (``sys.argv[1:]`` when ``None``): the construction every command shares.

    ``parser_kwargs`` (``prog``, ``description``) are the root parser's, on top of the shared settings.
    """
    # Subcommands nest the config under ``fit.``/``test.``...; relative paths let configs write ``${data.x}``.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    command = _subcommand_in(args) if run else cli_class.command
    # Config files naming a ``__base__`` are composed here, before jsonargparse reads them (swinlab.config_compose);
    # a recipe's fit-only settings are dropped for the other commands, which do not have them.
    args = expand_command_line(args, drop_keys=() if command in ("fit", None) else FIT_ONLY_KEYS)
    strict = {"exit_on_error": False, "allow_abbrev": False}
    return cli_class(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        # ``omegaconf+`` resolves ``${...}`` after all configs and command-line overrides are merged, so a value
        # such as the image size is set once, and overriding it on the command line reaches every use.
        # Parse errors raise (``exit_on_error``) so that ``parse_arguments`` can name the closest valid key; no
        # abbreviated flags (``--trainer.max_epoch`` would silently mean ``max_epochs``).
        parser_kwargs={
            "parser_mode": "omegaconf+",
            "formatter_class": _HelpFormatter,
            **strict,
            **parser_kwargs,
            **{subcommand: dict(strict) for subcommand in SUBCOMMANDS},  # LightningCLI adds to each
        },
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None, run: bool = True) -> SwinLabCLI:
    """Run the CLI on ``args`` (``sys.argv[1:]`` when ``None``); tests call it with a list.

    ``run=False`` parses ``args`` as ``fit`` does, without a subcommand, and only instantiates trainer, model and data.
    """
    return build_cli(SwinLabCLI, args, run, description=_description())
