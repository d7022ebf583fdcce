"""Dataset presets: what `--dataset NAME` sets when a flag is not given (README "Your own
data"). `deepglobe` (the default) is exactly the original's settings (docs/MODEL.md section
6); its per-mode epochs, learning rates and task names are helper.STAGES' own.

`add_dataset_args(parser)` adds --dataset and --classes to a parser; `classes_from_args(args)`
gives the run's ClassTable; `apply_preset(args)` fills the flags left at None from the preset
(train_deep_globe.py's flags whose help says 'from --dataset').

Choices where the papers say nothing (documented in README "Your own data"):
- inria: batch 4, sub-batch 6 and 536 px patches are the GLNet authors' answers. size_g 536:
  the global view then holds as many pixels as one patch, as DeepGlobe's 508/508 does (a
  5000 px tile is downsampled 9.3x, DeepGlobe's 2448 px 4.8x); 508 would break that symmetry
  for no gain, and a larger view costs mode-3 memory with every patch.
- isic: DeepGlobe's settings (508/508, batch 6, sub-batch 6): ISIC 2018 images (about 600 to
  6700 px a side) are in DeepGlobe's size range, so a 508 px patch and view fit them alike.
- epochs and learning rates of inria and isic: DeepGlobe's (no published figures).
- urur: 508/508, batch 6, sub-batch 6, DeepGlobe's epochs and learning rates. Our choice: the
  settings behind the benchmark's GLNet figure (41.2 mIoU) are not public. A 5120 px image is
  downsampled 10x for the global view (DeepGlobe's 4.8x) and cut into 12 x 12 patches.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from dataset.classes import DEEPGLOBE, INRIA, ISIC, URUR, ClassTable, class_table, load_class_table
from utils.errors import UserError


@dataclass(frozen=True)
class Preset:
    """Defaults of one --dataset. `classes` None: the table comes from --classes (required).
    `epochs`, `lr`, `task_names`: per mode; a mode left out takes helper.STAGES' default."""

    name: str
    classes: ClassTable | None
    data_path: str
    size_g: int
    size_p: int
    batch_size: int
    sub_batch_size: int
    path_g: str
    path_g2l: str
    path_l2g: str
    path_local: str = ""  # (every preset names one; a default only because it comes after path_l2g)
    epochs: dict[int, int] = field(default_factory=dict)
    lr: dict[int, float] = field(default_factory=dict)
    task_names: dict[int, str] = field(default_factory=dict)
    about: str = ""
    prepare: str = ""  # how to make data_path, for the error when it is missing

    @property
    def n_class(self) -> int | None:
        return None if self.classes is None else self.classes.n_class


def _names(prefix: str) -> dict:
    """Task and checkpoint names of a data set: fpn_<prefix>_global, _global2local, _local2global, _local."""
    stages = {1: "global", 2: "global2local", 3: "local2global", 4: "local"}
    tasks = {m: f"fpn_{prefix}_{s}" for m, s in stages.items()}
    return dict(task_names=tasks, path_g=tasks[1] + ".pth", path_g2l=tasks[2] + ".pth", path_l2g=tasks[3] + ".pth",
                path_local=tasks[4] + ".pth")


PRESETS: dict[str, Preset] = {
    "deepglobe": Preset(
        "deepglobe", DEEPGLOBE, "./data/deep_globe/", 508, 508, 6, 6,
        path_g="fpn_deepglobe_global.pth", path_g2l="fpn_deepglobe_global2local.pth",
        path_l2g="fpn_deepglobe_local2global.pth", path_local="fpn_deepglobe_local.pth",
        about="DeepGlobe land cover, 7 classes, 2448 px; the paper's settings",
        prepare="convert the download with: python -m dataset.prepare_deep_globe --raw_path RAW --data_path OUT",
    ),
    "inria": Preset(
        "inria", INRIA, "./data/inria/", 536, 536, 4, 6, **_names("inria"),
        about="Inria aerial buildings, 2 classes (0/1 or 0/255 masks), 5000 px tiles",
        prepare="convert the download with: python -m dataset.prepare_inria --raw_path RAW --data_path OUT",
    ),
    "isic": Preset(
        "isic", ISIC, "./data/isic/", 508, 508, 6, 6, **_names("isic"),
        about="ISIC 2018 skin lesions, 2 classes (0/1 or 0/255 masks), mixed sizes",
        prepare="convert the download with: python -m dataset.prepare_isic --raw_path RAW --data_path OUT",
    ),
    "urur": Preset(
        "urur", URUR, "./data/urur/", 508, 508, 6, 6, **_names("urur"),
        about="URUR ultra-rich context, 8 classes (0..7 masks), 5120 px; mIoU over 1..7 and over 0..7",
        prepare="convert the download with: python -m dataset.prepare_urur --raw_path RAW --data_path OUT",
    ),
    "folder": Preset(
        "folder", None, "./data/folder/", 508, 508, 6, 6, **_names("folder"),
        about="any data in the <split>/Sat, <split>/Label layout; needs --classes FILE",
        prepare="put the images in <split>/Sat/<id>_sat.<jpg,png,tif> and the masks in <split>/Label/<id>_mask.png "
                "(README 'Your own data')",
    ),
}
DEFAULT = "deepglobe"
# flags a preset fills when they are not given (train_deep_globe.py leaves them at None)
PRESET_FLAGS = ("n_class", "data_path", "size_g", "size_p", "batch_size", "sub_batch_size",
                "path_g", "path_g2l", "path_l2g", "path_local")


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """--dataset {deepglobe,inria,isic,urur,folder} (default deepglobe) and --classes FILE."""
    parser.add_argument("--dataset", choices=tuple(PRESETS), default=DEFAULT,
                        help="dataset preset: its class table and the defaults of the flags marked "
                             "'from --dataset'; " + "; ".join(f"{p.name}: {p.about}" for p in PRESETS.values()))
    parser.add_argument("--classes", type=str, default=None,
                        help="class table file (.json or .csv, e.g. Kaggle's class_dict.csv: name,r,g,b): "
                             "names, mask values, colours, mIoU classes; needed by --dataset folder, "
                             "replaces the table of the others (default: the preset's table)")


def preset_help(flag: str) -> str:
    """'(default: from --dataset: 508 for deepglobe, 536 for inria, ...)' for a help text."""
    values = []
    for p in PRESETS.values():
        v = p.n_class if flag == "n_class" else getattr(p, flag)
        values.append(f"{'that of --classes' if v is None else v} for {p.name}")
    return f"(default: {values[0]}; from --dataset: {', '.join(values[1:])})"


def classes_from_args(args: argparse.Namespace) -> ClassTable:
    """The run's class table: --classes FILE if given, else the --dataset preset's (for
    deepglobe, `class_table(--n_class)`, as before presets). An --n_class that disagrees
    with the table, or --dataset folder without --classes, is a UserError."""
    preset = PRESETS[getattr(args, "dataset", None) or DEFAULT]
    n_class = getattr(args, "n_class", None)
    path = getattr(args, "classes", None)
    if path:
        table = load_class_table(path)
        source = f"--classes {path}"
    elif preset.classes is None:
        raise UserError(f"--dataset {preset.name} needs --classes FILE, a class table (.json or .csv; "
                        "README 'Your own data' shows both)")
    elif preset.name == DEFAULT and n_class is not None:
        try:
            return class_table(n_class)  # DeepGlobe's for 7, generic classes otherwise
        except ValueError as e:
            raise UserError(f"--n_class: {e}") from None
    else:
        table, source = preset.classes, f"--dataset {preset.name}"
    if n_class is not None and n_class != table.n_class:
        raise UserError(f"--n_class {n_class} disagrees with the class table of {source} ({table.n_class} classes: "
                        f"{', '.join(table.names)}); leave --n_class out")
    return table


def dataset_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of `DeepGlobe.open` for a run: the class table, the hint of a
    missing --data_path, --crop_foreground and the global view (--global_view aspect needs --batch_size 1:
    global views of different shapes cannot be stacked into one batch)."""
    view = getattr(args, "global_view", "square")
    if view == "aspect" and args.batch_size != 1:
        raise UserError(f"--global_view aspect needs --batch_size 1 (global views of different shapes cannot share "
                        f"a batch), got {args.batch_size}")
    return {"classes": classes_from_args(args), "hint": PRESETS[args.dataset].prepare, "global_view": view,
            "crop_foreground": getattr(args, "crop_foreground", False)}


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left at None (PRESET_FLAGS; --num_epochs, --lr, --task_name per mode
    where the preset has them) from the --dataset preset; check the class table."""
    preset = PRESETS[args.dataset]
    table = classes_from_args(args)
    for name in PRESET_FLAGS:
        if getattr(args, name, None) is None:
            setattr(args, name, table.n_class if name == "n_class" else getattr(preset, name))
    mode = getattr(args, "mode", None)
    for name, per_mode in (("num_epochs", preset.epochs), ("lr", preset.lr), ("task_name", preset.task_names)):
        if getattr(args, name, None) is None and mode in per_mode:
            setattr(args, name, per_mode[mode])
    return args
