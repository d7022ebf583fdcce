"""GLNet: collaborative global-local FPNs (GLNET_SPEC.md sections 1-5).

The module only holds parameters; all per-image state (global features, merged
local maps) travels through the `Maps` container that the functions below take
and return. The device is the inputs' device.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.resnet import ResNet50Features
from utils.geometry import PatchGrid, crop_global, merge_local, normalize_merged


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of x to like's spatial size (align_corners=False, as the original)."""
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def _cat(*xs: torch.Tensor) -> torch.Tensor:
    return torch.cat(xs, dim=1)


class Maps(NamedTuple):
    """Feature maps of one FPN branch.

    c: (c2, c3, c4, c5) backbone stages; ps0/ps1/ps2: (p5, p4, p3, p2) after the
    top-down pass and the two smoothing stages; ps3: the concatenated (and for
    context paths smoothed) map that `classify` sees; output: class logits at 1/4.
    As context (local canvases for the global branch, global crops for the local
    branch) only c, ps0, ps1, ps2 are used.
    """

    c: Sequence[torch.Tensor]
    ps0: Sequence[torch.Tensor]
    ps1: Sequence[torch.Tensor]
    ps2: Sequence[torch.Tensor]
    ps3: torch.Tensor | None = None
    output: torch.Tensor | None = None

    def context(self) -> list[torch.Tensor]:
        """The 16 maps shared with the other branch, in a fixed order."""
        return [*self.c, *self.ps0, *self.ps1, *self.ps2]

    @classmethod
    def from_context(cls, maps: Sequence[torch.Tensor]) -> "Maps":
        return cls(maps[0:4], maps[4:8], maps[8:12], maps[12:16])


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=k, stride=1, padding=k // 2)


class Keep:
    """Memory policy of an FPN pass that keeps every map (training: autograd needs them;
    mode 2 crops all of the global maps)."""

    def release(self, group: str, own: list, other) -> None:
        pass


class Release:
    """Memory policy of inference: each group of maps (c, ps0, ps1, ps2) is handed to
    `sink(group, maps)` if given and then dropped as soon as the FPN is done with it, so
    that it is not alive while the larger later stages run. other=True: the other
    branch's group goes too (its fields must then be lists, which are emptied)."""

    def __init__(self, sink=None, other: bool = False) -> None:
        self.sink, self.other = sink, other

    def release(self, group: str, own: list, other) -> None:
        if self.sink is not None:
            self.sink(group, tuple(own))
        own.clear()
        if self.other and other is not None:
            other.clear()


KEEP = Keep()
_LATERAL = ("toplayer", "latlayer1", "latlayer2", "latlayer3")  # p5, p4, p3, p2


class _FPNBase(nn.Module):
    """The FPN of GLNET_SPEC.md sections 2-3, shared by both branches; `fold` = 2 doubles
    the input channels where the other branch's maps are concatenated."""

    def _make_layers(self, n_class: int, fold: int, suffix: str, with_classify: bool) -> None:
        layers = {
            "toplayer": _conv(2048 * fold, 256, 1),
            "latlayer1": _conv(1024 * fold, 256, 1),
            "latlayer2": _conv(512 * fold, 256, 1),
            "latlayer3": _conv(256 * fold, 256, 1),
        }
        for k in range(1, 5):
            layers[f"smooth{k}_1"] = _conv(256 * fold, 256, 3)
        for k in range(1, 5):
            layers[f"smooth{k}_2"] = _conv(256 * fold, 128, 3)
        for name, layer in layers.items():
            self.add_module(name + suffix, layer)
        if with_classify:
            self.classify = _conv(512, n_class, 3)

    def _init_weights(self) -> None:
        # GLNET_SPEC.md section 1: FPN convs N(0, 0.01), bias 0. (Nothing to do on the
        # meta device, where evaluation builds models that a checkpoint then fills.)
        for m in self.children():
            if m.weight.is_meta:
                continue
            nn.init.normal_(m.weight, mean=0.0, std=0.01)
            nn.init.constant_(m.bias, 0.0)

    def _run(self, c: list, other: Maps | None, sfx: str, policy=KEEP) -> Maps:
        """The FPN on backbone maps c = [c2, c3, c4, c5] (a list). With `other`, the other
        branch's map of each level is concatenated after the own one, the layers are those
        named with `sfx`, and ps3 is smoothed. `policy` decides what happens to each group
        of maps once the FPN is done with it (Keep, Release)."""
        layer = lambda name: getattr(self, name + sfx)  # noqa: E731
        o = other if other is not None else Maps([None] * 4, [None] * 4, [None] * 4, [None] * 4)

        def join(x, y):
            return x if y is None else _cat(x, y)

        ps0 = []  # p5, p4, p3, p2: top-down, from c5 to c2
        for k, name in enumerate(_LATERAL):
            lateral = lambda: layer(name)(join(c[3 - k], o.c[3 - k]))  # noqa: E731
            ps0.append(lateral() if k == 0 else _up(ps0[-1], c[3 - k]) + lateral())
        policy.release("c", c, o.c)
        ps1 = [layer(f"smooth{k + 1}_1")(join(ps0[k], o.ps0[k])) for k in range(4)]
        policy.release("ps0", ps0, o.ps0)
        ps2 = [layer(f"smooth{k + 1}_2")(join(ps1[k], o.ps1[k])) for k in range(4)]
        policy.release("ps1", ps1, o.ps1)
        ps3 = self._concat_levels(ps2, other.ps2 if other is not None else None)
        policy.release("ps2", ps2, o.ps2)
        if other is not None:
            ps3 = self.smooth(ps3)
        return Maps(c, ps0, ps1, ps2, ps3, self.classify(ps3))

    @staticmethod
    def _concat_levels(own: Sequence[torch.Tensor], other: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """concat(up(p5), up(p4), up(p3), p2) at p2's size, each level being cat(own, other)
        when `other` is given. Written part by part into one buffer: the same values as
        resizing the concatenated levels, without holding the parts and the result at once
        (resizing acts per channel, so up(cat(a, b)) == cat(up(a), up(b)))."""
        parts = [[x] if other is None else [x, other[k]] for k, x in enumerate(own)]
        ref = own[3]
        n, _, h, w = ref.shape
        width = sum(x.shape[1] for level in parts for x in level)
        out = ref.new_empty((n, width, h, w))
        at = 0
        for k, level in enumerate(parts):
            for x in level:
                x = x if k == 3 else _up(x, ref)
                out[:, at : at + x.shape[1]] = x
                at += x.shape[1]
        return out


class FPNGlobal(_FPNBase):
    """Global FPN (section 2): plain, or with merged local maps as context (`*_ext` layers).

    context=False builds only the plain path (no `*_ext` layers, no `smooth`): what a
    model that never sees local context needs (mode 1 evaluation, the frozen global
    model of mode 3)."""

    def __init__(self, n_class: int, context: bool = True) -> None:
        super().__init__()
        self.with_context = context
        self._make_layers(n_class, fold=1, suffix="", with_classify=True)
        if context:
            self._make_layers(n_class, fold=2, suffix="_ext", with_classify=False)
            self.smooth = _conv(1024, 512, 3)
        self._init_weights()

    def forward(self, c: list, local: Maps | None = None, policy=KEEP) -> Maps:
        """c: the global backbone's maps (a list); `local`: the merged local maps (mode 3)."""
        if local is not None and not self.with_context:
            raise ValueError("this global FPN was built with context=False: it cannot take local maps")
        return self._run(c, local, "" if local is None else "_ext", policy)

    @staticmethod
    def is_context_key(name: str) -> bool:
        """Whether a parameter name (relative to the FPN) belongs to the context path."""
        head = name.split(".")[0]
        return head.endswith("_ext") or head == "smooth"


class FPNLocal(_FPNBase):
    """Local FPN (section 3): always with global context, already cropped and
    resized to the local maps' sizes."""

    def __init__(self, n_class: int) -> None:
        super().__init__()
        self._make_layers(n_class, fold=2, suffix="", with_classify=True)
        self.smooth = _conv(1024, 512, 3)
        self._init_weights()

    def forward(self, c: list, glob: Maps, policy=KEEP) -> Maps:
        return self._run(c, glob, "", policy)


class _Crops:
    """Global maps cropped to patches and resized to the local sizes, made when a
    level is used: the FPN uses each once, so only one crop is alive at a time."""

    def __init__(self, maps, sizes, grid: PatchGrid, index: Sequence[int]) -> None:
        self.maps, self.sizes, self.grid, self.index = maps, sizes, grid, index

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, k: int) -> torch.Tensor:
        return crop_global(self.maps[k], self.grid, self.index, self.sizes[k])


def _context(glob: Maps, sizes, grid: PatchGrid, index: Sequence[int]) -> Maps:
    """The global maps as the local FPN's context for patches `index`: crops resized to
    the local sizes (c2..c5 sizes; p5..p2 have the sizes of c5..c2), made when used."""
    return Maps(
        _Crops(glob.c, sizes, grid, index),
        *(_Crops(level, sizes[::-1], grid, index) for level in (glob.ps0, glob.ps1, glob.ps2)),
    )


class GLNet(nn.Module):
    """The authors' `fpn` module: two ResNet-50s, two FPNs and the ensemble conv.

    Parameter names match the released checkpoints (with a `module.` prefix there).
    `forward` is the plain global path (mode 1); the other modes are the functions
    `global2local` and `local2global_*` below.
    """

    def __init__(self, n_class: int, local: bool = True, context: bool = True) -> None:
        """local=False leaves out the local branch (resnet_local, fpn_local are None).
        context=False (with local=False) also leaves out what only combines the branches:
        fpn_global's context layers and ensemble_conv. GLNet(n, local=False,
        context=False) is the plain global network of mode 1, which is all that mode-1
        evaluation and the frozen global model of mode 3 use."""
        super().__init__()
        if not context and local:
            raise ValueError("context=False needs local=False")
        self.n_class = n_class
        self.resnet_global = ResNet50Features()
        self.resnet_local = ResNet50Features() if local else None
        self.fpn_global = FPNGlobal(n_class, context)
        self.fpn_local = FPNLocal(n_class) if local else None
        self.ensemble_conv = _conv(128 * 4 * 2, n_class, 3) if context else None
        if context and not self.ensemble_conv.weight.is_meta:
            nn.init.normal_(self.ensemble_conv.weight, mean=0.0, std=0.01)

    def omits(self, key: str) -> bool:
        """Whether `key` (a checkpoint key without `module.`) names a part this model
        was built without; loading skips such keys instead of calling them unexpected."""
        part, _, rest = key.partition(".")
        if part in ("resnet_local", "fpn_local"):
            return self.resnet_local is None
        if part == "ensemble_conv":
            return self.ensemble_conv is None
        if part == "fpn_global":
            return not self.fpn_global.with_context and FPNGlobal.is_context_key(rest)
        return False

    def forward(self, image_global: torch.Tensor) -> torch.Tensor:
        """Mode 1: class logits at 1/4 of the global image."""
        return self.global_maps(image_global).output

    def global_maps(self, image_global: torch.Tensor, local: Maps | None = None, policy=KEEP) -> Maps:
        """Global branch on (B, 3, size_g, size_g); `local` = merged local canvases (mode 3).
        policy=Release(other=True) (inference): every map is dropped once the FPN is done
        with it, those of `local` too (its fields must be lists, which are emptied); the
        result then holds only ps3 and output."""
        return self.fpn_global(list(self.resnet_global(image_global)), local, policy)

    def local_maps(self, patches: torch.Tensor, glob: Maps, grid: PatchGrid, index: Sequence[int]) -> Maps:
        """Local branch on patches (n, 3, p, p) = patches `index` of `grid`, with crops of
        one image's global maps `glob` (batch of 1) as context (section 3)."""
        c = self.resnet_local(patches)
        return self.fpn_local(list(c), _context(glob, [x.shape[-2:] for x in c], grid, index))

    def local_maps_released(
        self, patches: torch.Tensor, glob: Maps, grid: PatchGrid, index: Sequence[int], sink,
        backbone_batch: int | None = None,
    ) -> torch.Tensor:
        """`local_maps` for inference: the FPN runs one patch at a time and hands each
        patch's c, ps0, ps1, ps2 and ps3 to sink(group, maps, [patch index]) as soon as it
        is done with them (then drops them); returns the logits of all patches.
        `backbone_batch` patches at a time go through the ResNet (default: all).

        Convolutions, resizes and crops act per sample: the same values as `local_maps`,
        up to the float rounding of the kernel oneDNN picks for one sample."""
        out = []
        step = backbone_batch or len(index)
        for start in range(0, len(index), step):
            chunk = list(self.resnet_local(patches[start : start + step]))
            sizes = [x.shape[-2:] for x in chunk]
            n = chunk[0].shape[0]
            for i in range(n):
                k = [index[start + i]]
                # one patch: hand over the list itself, which the FPN empties once done with it
                c = chunk if n == 1 else [x[i : i + 1] for x in chunk]
                policy = Release(lambda group, maps: sink(group, maps, k))
                m = self.fpn_local(c, _context(glob, sizes, grid, k), policy)
                sink("ps3", m.ps3, k)
                out.append(m.output)
            del chunk
        return torch.cat(out)

    def ensemble(self, ps3_local: torch.Tensor, ps3_global_crop: torch.Tensor) -> torch.Tensor:
        return self.ensemble_conv(_cat(ps3_local, ps3_global_crop))


def global2local(
    model: GLNet, patches: torch.Tensor, glob: Maps, grid: PatchGrid, index: Sequence[int],
    low_memory: bool = False, backbone_batch: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mode 2 on one sub-batch of patches of one image (section 5).

    `glob`: that image's global maps (computed once, without grad). Returns
    (output_ensemble, output_local, fmreg) where fmreg = MSE(ps3_l, crop(ps3_g)).
    low_memory (inference only): the local FPN and the ensemble run patch by patch,
    dropping each map once used; same outputs (fmreg: the mean of per-patch MSEs);
    `backbone_batch`: see `GLNet.local_maps_released`.
    """
    if not low_memory:
        loc = model.local_maps(patches, glob, grid, index)
        ps3_g2l = crop_global(glob.ps3, grid, index, loc.ps3.shape[-2:])
        return model.ensemble(loc.ps3, ps3_g2l), loc.output, F.mse_loss(loc.ps3, ps3_g2l)
    ens, mse = [], []

    def take(name, maps, idx):
        if name == "ps3":
            g = crop_global(glob.ps3, grid, idx, maps.shape[-2:])
            ens.append(model.ensemble(maps, g))
            mse.append(F.mse_loss(maps, g))

    out = model.local_maps_released(patches, glob, grid, index, take, backbone_batch)
    return torch.cat(ens), out, torch.stack(mse).mean()


class LocalPass(NamedTuple):
    """Mode 3, first pass over one image's patches: merged canvases for the global
    branch, and per patch the local logits and what `keep` asked for: the local ps3,
    or the local half of the ensemble conv applied to it (or neither)."""

    context: Maps
    outputs: torch.Tensor
    ps3: torch.Tensor | None
    ensemble_local: torch.Tensor | None


def local2global_collect(
    model: GLNet,
    frozen_glob: Maps,
    patch_batches,
    grid: PatchGrid,
    template: torch.Tensor,
    keep: str | None = "ps3",
    store: torch.device | str | None = None,
    backbone_batch: int | None = None,
    keep_outputs: bool = True,
    spill=None,
) -> LocalPass:
    """Mode 3 first pass (section 5): run the model's local branch on every patch
    with crops of the frozen global model's maps, merging c2..c5, ps0, ps1, ps2
    into canvases sized like those maps.

    patch_batches yields (index, patches) sub-batches covering the whole grid.
    keep="ps3": store each patch's ps3 (training needs it for ensemble_conv);
    "ensemble_local": store only ensemble_conv's local half applied to it (n_class
    channels instead of 512), which is all inference needs; None: neither. `store`:
    device for the per-patch results (default: the patches' device).
    `backbone_batch`: see `GLNet.local_maps_released`. Runs without grad.
    Bounded memory (predict.py): keep_outputs=False drops the local logits; `spill(x)`
    receives each patch's kept map (1, ...) instead of this function keeping it.
    `template`: as for `normalize_merged`.
    """
    targets = frozen_glob.context()
    # float32 canvases, also under autocast: they sum many patches
    canvases = [t.new_zeros((1, *t.shape[1:]), dtype=torch.float32) for t in targets]
    groups = {"c": canvases[0:4], "ps0": canvases[4:8], "ps1": canvases[8:12], "ps2": canvases[12:16]}
    outputs, kept = [], []
    w_local = model.ensemble_conv.weight[:, : 128 * 4].contiguous() if keep == "ensemble_local" else None

    def park(x: torch.Tensor) -> torch.Tensor:
        return x.to(store) if store is not None else x

    def put(x: torch.Tensor) -> None:
        if spill is not None:
            spill(x)
        else:
            kept.append(park(x))

    def take(name, maps, idx):
        """Sink of the local FPN: merge each patch's maps as soon as they are made."""
        if name != "ps3":
            for canvas, m in zip(groups[name], maps):
                merge_local(canvas, m, grid, idx)
        elif keep == "ps3":
            put(maps)
        elif keep == "ensemble_local":
            put(F.conv2d(maps, w_local, None, padding=1))

    with torch.no_grad():
        for index, patches in patch_batches:
            out = model.local_maps_released(patches, frozen_glob, grid, index, take, backbone_batch)
            if keep_outputs:
                outputs.append(park(out))
            del out
    context = Maps.from_context([normalize_merged(c, template, inplace=True) for c in canvases])
    kept = torch.cat(kept) if kept else None
    return LocalPass(
        context, torch.cat(outputs) if outputs else None,
        kept if keep == "ps3" else None, kept if keep == "ensemble_local" else None,
    )


def local2global_ensemble(
    model: GLNet, ps3_global: torch.Tensor, grid: PatchGrid, index: Sequence[int],
    ps3_local: torch.Tensor | None = None, ensemble_local: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mode 3 ensemble logits for patches `index` of one image: ensemble_conv over
    cat(ps3_l, crop(ps3_g) resized to ps3_l's size). ps3_global: (1, 512, h, w).

    Give either ps3_local (n, 512, hl, wl) or ensemble_local, the precomputed local
    half of the conv (see `local2global_collect`); the conv is linear, so the two
    halves add up to the same logits (up to float rounding).
    """
    if ps3_local is not None:
        fg = crop_global(ps3_global, grid, index, ps3_local.shape[-2:])
        return model.ensemble(ps3_local, fg)
    fg = crop_global(ps3_global, grid, index, ensemble_local.shape[-2:])
    conv = model.ensemble_conv
    return ensemble_local + F.conv2d(fg, conv.weight[:, 128 * 4 :], conv.bias, padding=1)
