"""GLNet: collaborative global-local FPNs (docs/MODEL.md sections 1-5).

The module only holds parameters; all per-image state (global features, merged
local maps) travels through the `Maps` container that the functions below take
and return. The device is the inputs' device.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

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


class KeepMaps:
    """What an FPN pass does with each group of maps (c, ps0, ps1, ps2) once it has used
    it, in training: nothing (autograd needs them; mode 2 crops every global map)."""

    def done(self, group: str, own: list, other) -> None:
        pass


class FreeMaps:
    """Inference: each group of maps is freed as soon as the FPN has used it, so that it is
    not alive while the larger later stages run. The FPN's own lists are emptied; with
    context=True also the lists of the other branch's maps it was given, which the caller
    hands over with the call (mode 3's merged canvases)."""

    def __init__(self, context: bool = False) -> None:
        self.context = context

    def done(self, group: str, own: list, other) -> None:
        own.clear()
        if self.context and other is not None:
            other.clear()


class LocalCanvases:
    """Mode 3: the local branch's c2..c5, ps0, ps1, ps2 merged over all patches of one image
    (section 4), one float32 canvas per map of the frozen global model, sized like it (float32
    also under autocast: they sum many patches). `merge` adds one patch's maps of a group;
    `finish` divides by the coverage once all patches are in."""

    def __init__(self, like: Maps) -> None:
        canvases = [t.new_zeros((1, *t.shape[1:]), dtype=torch.float32) for t in like.context()]
        self.groups = {"c": canvases[0:4], "ps0": canvases[4:8], "ps1": canvases[8:12], "ps2": canvases[12:16]}

    def merge(self, group: str, maps: Sequence[torch.Tensor], grid: PatchGrid, patch: int) -> None:
        for canvas, m in zip(self.groups[group], maps):
            merge_local(canvas, m, grid, [patch])

    def finish(self, coverage) -> Maps:
        """The merged maps, normalised in place (`coverage`: as `normalize_merged`'s template).
        Their fields are lists: FreeMaps(context=True) can hand them over to the global FPN."""
        canvases = [c for group in ("c", "ps0", "ps1", "ps2") for c in self.groups[group]]
        self.groups = {}
        return Maps.from_context([normalize_merged(c, coverage, inplace=True) for c in canvases])


class MergeMaps:
    """Mode 3's local pass: each group of one patch's maps is merged into the image's
    `LocalCanvases` as soon as the FPN has used it, then freed."""

    def __init__(self, canvases: LocalCanvases, grid: PatchGrid, patch: int) -> None:
        self.canvases, self.grid, self.patch = canvases, grid, patch

    def done(self, group: str, own: list, other) -> None:
        self.canvases.merge(group, own, self.grid, self.patch)
        own.clear()


KEEP_MAPS = KeepMaps()
_LATERAL = ("toplayer", "latlayer1", "latlayer2", "latlayer3")  # p5, p4, p3, p2


class _FPNBase(nn.Module):
    """The FPN of docs/MODEL.md sections 2-3, shared by both branches; `fold` = 2 doubles
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
        # docs/MODEL.md section 1: FPN convs N(0, 0.01), bias 0. (Nothing to do on the
        # meta device, where evaluation builds models that a checkpoint then fills.)
        for m in self.children():
            if m.weight.is_meta:
                continue
            nn.init.normal_(m.weight, mean=0.0, std=0.01)
            nn.init.constant_(m.bias, 0.0)

    def _run(self, c: list, other: Maps | None, sfx: str, policy=KEEP_MAPS) -> Maps:
        """The FPN on backbone maps c = [c2, c3, c4, c5] (a list). With `other`, the other
        branch's map of each level is concatenated after the own one, the layers are those
        named with `sfx`, and ps3 is smoothed. `policy.done` is called on each group of maps
        once the FPN is done with it (KeepMaps, FreeMaps, MergeMaps)."""
        layer = lambda name: getattr(self, name + sfx)  # noqa: E731
        o = other if other is not None else Maps([None] * 4, [None] * 4, [None] * 4, [None] * 4)

        def join(x, y):
            return x if y is None else _cat(x, y)

        ps0 = []  # p5, p4, p3, p2: top-down, from c5 to c2
        for k, name in enumerate(_LATERAL):
            lateral = lambda: layer(name)(join(c[3 - k], o.c[3 - k]))  # noqa: E731
            ps0.append(lateral() if k == 0 else _up(ps0[-1], c[3 - k]) + lateral())
        policy.done("c", c, o.c)
        ps1 = [layer(f"smooth{k + 1}_1")(join(ps0[k], o.ps0[k])) for k in range(4)]
        policy.done("ps0", ps0, o.ps0)
        ps2 = [layer(f"smooth{k + 1}_2")(join(ps1[k], o.ps1[k])) for k in range(4)]
        policy.done("ps1", ps1, o.ps1)
        ps3 = self._concat_levels(ps2, other.ps2 if other is not None else None)
        policy.done("ps2", ps2, o.ps2)
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

    def forward(self, c: list, local: Maps | None = None, policy=KEEP_MAPS) -> Maps:
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

    def forward(self, c: list, glob: Maps, policy=KEEP_MAPS) -> Maps:
        return self._run(c, glob, "", policy)


class LocalOnly(nn.Module):
    """The paper's "local only" baseline (section 9; `--mode local`): a ResNet-50 with a plain
    FPN on full-resolution patches, no global branch. Checkpoint keys `resnet_local.*` and
    `fpn_local.*`: its FPN is the plain global FPN (`FPNGlobal(context=False)`, sized for one
    branch's own maps alone) under the local name, so that no file of another stage fits it."""

    title = "the local-only network"  # how checkpoint errors name it

    def __init__(self, n_class: int) -> None:
        super().__init__()
        self.n_class = n_class
        self.resnet_local = ResNet50Features()
        self.fpn_local = FPNGlobal(n_class, context=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """Class logits (n, C, p/4, p/4) of patches (n, 3, p, p)."""
        return self.fpn_local(list(self.resnet_local(patches))).output

    def patch_logits(self, patches: torch.Tensor, backbone_batch: int | None = None) -> Iterator[torch.Tensor]:
        """`forward` for inference, `backbone_batch` patches at a time (default: all), each
        group of maps freed once the FPN is done with it. Convolutions act per sample: the
        same values as `forward`, up to the float rounding of the kernel picked."""
        step = backbone_batch or len(patches)
        for start in range(0, len(patches), step):
            yield self.fpn_local(list(self.resnet_local(patches[start : start + step])), policy=FreeMaps()).output


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
    `forward` is the plain global path (mode 1); the other modes are built from
    `global_maps`, `local_maps` / `local_patches` and the functions below.
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

    def global_maps(self, image_global: torch.Tensor, local: Maps | None = None, policy=KEEP_MAPS) -> Maps:
        """Global branch on (B, 3, size_g, size_g); `local` = merged local canvases (mode 3).
        policy=FreeMaps(context=True) (inference): every map is freed once the FPN is done
        with it, those of `local` too (its fields must be lists, which are emptied); the
        result then holds only ps3 and output."""
        return self.fpn_global(list(self.resnet_global(image_global)), local, policy)

    def local_maps(self, patches: torch.Tensor, glob: Maps, grid: PatchGrid, index: Sequence[int]) -> Maps:
        """Local branch on patches (n, 3, p, p) = patches `index` of `grid`, with crops of
        one image's global maps `glob` (batch of 1) as context (section 3)."""
        c = self.resnet_local(patches)
        return self.fpn_local(list(c), _context(glob, [x.shape[-2:] for x in c], grid, index))

    def local_patches(
        self, patches: torch.Tensor, glob: Maps, grid: PatchGrid, index: Sequence[int],
        canvases: LocalCanvases | None = None, backbone_batch: int | None = None,
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """`local_maps` for inference, one patch at a time: yields (patch index, ps3, logits)
        of each patch, both (1, ...). The FPN frees each group of the patch's maps once done
        with it, after merging it into `canvases` if given (mode 3). `backbone_batch`
        patches at a time go through the ResNet (default: all).

        Convolutions, resizes and crops act per sample: the same values as `local_maps`,
        up to the float rounding of the kernel oneDNN picks for one sample."""
        step = backbone_batch or len(index)
        for start in range(0, len(index), step):
            chunk = list(self.resnet_local(patches[start : start + step]))
            sizes = [x.shape[-2:] for x in chunk]
            n = chunk[0].shape[0]
            for i in range(n):
                k = index[start + i]
                # one patch: hand over the list itself, which the FPN empties once done with it
                c = chunk if n == 1 else [x[i : i + 1] for x in chunk]
                policy = FreeMaps() if canvases is None else MergeMaps(canvases, grid, k)
                m = self.fpn_local(c, _context(glob, sizes, grid, [k]), policy)
                yield k, m.ps3, m.output
            del chunk

    def ensemble(self, ps3_local: torch.Tensor, ps3_global_crop: torch.Tensor) -> torch.Tensor:
        return self.ensemble_conv(_cat(ps3_local, ps3_global_crop))


def global2local(
    model: GLNet, patches: torch.Tensor, glob: Maps, grid: PatchGrid, index: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mode 2 on one sub-batch of patches of one image (section 5), in training.

    `glob`: that image's global maps (computed once, without grad). Returns
    (output_ensemble, output_local, fmreg) where fmreg = MSE(ps3_l, crop(ps3_g)).
    (Inference: `inference.score_global2local`, patch by patch.)
    """
    loc = model.local_maps(patches, glob, grid, index)
    ps3_g2l = crop_global(glob.ps3, grid, index, loc.ps3.shape[-2:])
    return model.ensemble(loc.ps3, ps3_g2l), loc.output, F.mse_loss(loc.ps3, ps3_g2l)


def local2global_ensemble(
    model: GLNet, ps3_global: torch.Tensor, grid: PatchGrid, index: Sequence[int], ps3_local: torch.Tensor,
) -> torch.Tensor:
    """Mode 3 ensemble logits for patches `index` of one image: ensemble_conv over
    cat(ps3_l, crop(ps3_g) resized to ps3_l's size). ps3_global: (1, 512, h, w);
    ps3_local: (n, 512, hl, wl)."""
    fg = crop_global(ps3_global, grid, index, ps3_local.shape[-2:])
    return model.ensemble(ps3_local, fg)


def ensemble_local_half(model: GLNet, ps3_local: torch.Tensor) -> torch.Tensor:
    """The local half of mode 3's ensemble conv applied to patches' ps3 (no bias): n_class
    channels instead of 512, which is all that inference keeps of a patch until the global
    branch has run. The conv is linear: `ensemble_with_global` adds the other half."""
    return F.conv2d(ps3_local, model.ensemble_conv.weight[:, : 128 * 4].contiguous(), None, padding=1)


def ensemble_with_global(
    model: GLNet, local_half: torch.Tensor, ps3_global: torch.Tensor, grid: PatchGrid, index: Sequence[int],
) -> torch.Tensor:
    """Mode 3 ensemble logits of patches `index` from their `ensemble_local_half` and crops
    of the global ps3 (1, 512, h, w): the same logits as `local2global_ensemble` up to float
    rounding."""
    fg = crop_global(ps3_global, grid, index, local_half.shape[-2:])
    conv = model.ensemble_conv
    return local_half + F.conv2d(fg, conv.weight[:, 128 * 4 :], conv.bias, padding=1)
