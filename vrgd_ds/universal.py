"""Universal checkpoints that keep the VRGD optimizer state (ZeRO 1/2, any world size).

DeepSpeed's converter (``python -m deepspeed.checkpoint.ds_to_universal``, 0.19.8) writes, per
parameter, the fp32 weights and a hard-coded list of optimizer-state keys — ``exp_avg``,
``exp_avg_sq`` and ``step`` (``extract_zero_shards`` and ``merge_tp_slices``). What a VR
optimizer keeps besides is dropped without a word:

* ``gsnr_momentum`` (VRAdam/VRLamb, or ``gsnr_beta`` set): one fp32 per element of the flat
  ZeRO partition, like ``exp_avg``; VRSGD/VRLars's ``momentum_buffer`` is the same kind (there
  DeepSpeed's converter stops with a ``KeyError: 'exp_avg'``);
* ``tensor_step``: one step count per parameter tensor of the flat group, present once some
  tensor missed a step (VRGD.md §0). It is indexed by the tensor's place in ZeRO's
  ``round_robin_bit16_groups``, so it needs a per-tensor mapping, not a per-element one.

A run resumed from such a checkpoint restarts the GSNR momentum (and the bias corrections of a
tensor that missed a step) and silently continues differently. Loading, on the other hand, is
generic: ``load_hp_checkpoint_state`` loads *every* ``<key>.pt`` of a parameter's folder and
``map_to_flat_opt_states`` lays it out on the new partition, whatever the key.

So :func:`convert` (``python -m vrgd_ds.universal``, the same arguments as DeepSpeed's
converter) runs DeepSpeed's own conversion with the key list taken from the saved state instead
(every per-element tensor of a group's state becomes ``zero/<param>/<key>.pt``, next to
``exp_avg.pt``), and writes the per-tensor step counts by parameter name to
``zero/vrgd_universal.pt``. :func:`install` (called by the DeepSpeed glue for every VR engine)
wraps the engine's universal loading: after DeepSpeed has loaded the per-element state onto the
new partitions, ``tensor_step`` is rebuilt in the new engine's tensor order.

Refused at ``engine.load_checkpoint``, on every rank, with a message saying what to do:

* a universal checkpoint written by DeepSpeed's converter (no ``vrgd_universal.pt``) for a VR
  optimizer that has state: what was dropped cannot be known, so it cannot be continued exactly;
* a checkpoint whose state does not match the optimizer (missing ``gsnr_momentum``, a tensor with
  no step count);
* ``load_universal`` at ZeRO stage 0: DeepSpeed 0.19.8 has no universal format there (its
  converter needs ZeRO optimizer files; its loader skips the model weights at stage 0, then fails
  on ``update_lp_params``); an ordinary stage-0 checkpoint is not partitioned and loads, VR state
  included, on any world size.

Tested (tests/test_universal_checkpoint.py): ZeRO 1 and 2, fp32, VRLamb (two param groups too)
and VRSGD with momentum, saved on 2 ranks, resumed on 1, 2 and 4. Pipeline stages (pp > 1) are
handled as DeepSpeed's converter handles them, untested; tensor parallelism is refused.
"""

from __future__ import annotations

import argparse
import functools
import glob
import os
import re
import shutil

import torch

__all__ = ["FORMAT_VERSION", "VRGD_FILE", "convert", "install", "installed"]

#: Written by :func:`convert` into ``<universal checkpoint>/zero/``.
VRGD_FILE = "vrgd_universal.pt"
FORMAT_VERSION = 1
_TMP = "__vrgd__"  # under the converter's temporary folder
_PER_TENSOR_KEYS = ("tensor_step",)

_STOCK_CONVERTER_MESSAGE = (
    "vrgd_ds: the universal checkpoint {folder} was converted by DeepSpeed's ds_to_universal, which keeps only "
    "exp_avg, exp_avg_sq and step: the VR optimizer's GSNR momentum (gsnr_momentum), momentum buffers and "
    "per-tensor step counts (tensor_step) were dropped, so this run could not continue as the saved one would. "
    "Convert the original checkpoint with vrgd_ds's converter instead (same arguments): "
    "python -m vrgd_ds.universal --input_folder <checkpoint>/<tag> --output_folder <universal>/<tag> "
    "[--inject_missing_state]"
)


# --------------------------------------------------------------------------------------------
# Conversion
def _flat_state(group_state: dict, numel: int, padded_numel: int, where: str) -> dict:
    """The per-element tensors of one group's saved state, without the partition's padding."""
    out = {}
    for key, value in group_state.items():
        if key == "step" or key in _PER_TENSOR_KEYS or not torch.is_tensor(value):
            continue
        if value.dim() == 1 and value.numel() in (numel, padded_numel):
            out[key] = value.narrow(0, 0, numel)
        else:
            raise ValueError(
                f"vrgd_ds.universal: optimizer state {key!r} of {where} has shape {tuple(value.shape)}, neither one "
                f"value per element ({numel}, or {padded_numel} with padding) nor a known per-tensor key "
                f"{_PER_TENSOR_KEYS}: it cannot be converted."
            )
    return out


def extract_zero_shards(dir, ds_checkpoint, indices_3D):
    """DeepSpeed's ``extract_zero_shards`` with the state keys taken from the state itself.

    Also dumps the group's per-tensor state (``tensor_step``) of this shard, by group index, into
    ``<dir>/__vrgd__/``; :func:`convert` maps it to parameter names afterwards. Paddings are
    stripped here, from per-element tensors only (DeepSpeed's reader would cut them off ``tensor_step`` too).
    """
    from deepspeed.checkpoint import ds_to_universal as dsu
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        GROUP_PADDINGS,
        OPTIMIZER_STATE_DICT,
        PARAM_SLICE_MAPPINGS,
        PIPELINE_REPLICATED_PARAMETER_PATTERNS,
        SINGLE_PARTITION_OF_FP32_GROUPS,
        UNIVERSAL_CHECKPOINT_INFO,
    )

    pp_index, tp_index, dp_index = indices_3D
    sd = ds_checkpoint.get_zero_checkpoint_state(
        pp_index=pp_index, tp_index=tp_index, dp_index=dp_index, strip_tensor_paddings=False
    )
    optim_sd = sd[OPTIMIZER_STATE_DICT]
    param_slice_mappings = optim_sd[PARAM_SLICE_MAPPINGS]
    uc_info = ds_checkpoint.get_checkpoint_info(UNIVERSAL_CHECKPOINT_INFO) or {}
    pipeline_replicated_params = uc_info.get(PIPELINE_REPLICATED_PARAMETER_PATTERNS, [])
    base = optim_sd[BASE_OPTIMIZER_STATE]
    state_groups = base["state"] if isinstance(base, dict) else base  # elastic checkpoints: a list
    fp32_groups = optim_sd[SINGLE_PARTITION_OF_FP32_GROUPS]
    paddings = optim_sd.get(GROUP_PADDINGS) or [0] * len(fp32_groups)

    per_tensor = {}
    for g, fp32 in enumerate(fp32_groups):
        has_state = (g < len(state_groups)) if isinstance(state_groups, list) else (g in state_groups)
        group_state = state_groups[g] if has_state else {}
        where = f"param group {g} (pp {pp_index}, tp {tp_index}, dp {dp_index})"
        flat_state = dict(fp32=fp32, **_flat_state(group_state, fp32.numel(), fp32.numel() + paddings[g], where))
        if "step" in group_state:
            flat_state["step"] = group_state["step"]
        per_tensor[g] = {key: group_state[key].clone() for key in _PER_TENSOR_KEYS if key in group_state}
        per_tensor[g]["_slice_names"] = list(param_slice_mappings[g].keys())

        for name, fragment_mapping in param_slice_mappings[g].items():
            if pp_index > 0 and any(re.match(pattern, name) for pattern in pipeline_replicated_params):
                continue  # tied weights replicated in the first and last stages (as DeepSpeed)
            for state_key, value in flat_state.items():
                dsu.dump_param_fragment(
                    dir, tp_index, dp_index, state_key, value, name, fragment_mapping.start, fragment_mapping.numel
                )
    extra = {"per_tensor": per_tensor}
    if isinstance(base, dict) and isinstance(base.get("vrgd"), dict):
        extra["vrgd"] = base["vrgd"]
    path = os.path.join(dir, _TMP, f"{pp_index}.{tp_index}.{dp_index}.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(extra, path)


def merge_extra_keys(zero_dir, slice_dir, tp_degree, name_and_shapes):
    """Merge the dp fragments of the state keys DeepSpeed's ``merge_tp_slices`` does not know."""
    from deepspeed.checkpoint import ds_to_universal as dsu
    from deepspeed.checkpoint.constants import CAT_DIM, PARAM

    name, per_tp_shapes = name_and_shapes
    keys = set()
    for path in glob.glob(os.path.join(slice_dir, name, "*", "*.*")):
        key = os.path.basename(path).rsplit(".", 1)[0]
        if key not in ("fp32", "exp_avg", "exp_avg_sq", "step"):
            keys.add(key)
    for key in sorted(keys):
        slices = dsu._merge_zero_shards(os.path.join(slice_dir, name), key, tp_degree, per_tp_shapes)
        if not slices:
            continue
        dsu._save_checkpoint(os.path.join(zero_dir, name, f"{key}.pt"), {PARAM: torch.cat(slices, dim=0), CAT_DIM: 0})
    return sorted(keys)


def _group_names(ds_checkpoint, pp_index: int, tp_index: int) -> list[list[str]]:
    """Parameter names of every param group, in ZeRO's ``round_robin_bit16_groups`` order (the
    order of ``tensor_step``), from the model-states file of stage ``pp_index``."""
    from deepspeed.checkpoint.constants import PARAM_SHAPES

    model_file = ds_checkpoint.mp_rank_files[pp_index * ds_checkpoint.tp_degree + tp_index]
    shapes = torch.load(model_file, map_location="cpu", weights_only=False).get(PARAM_SHAPES)
    if not isinstance(shapes, (list, tuple)):
        raise ValueError(
            f"vrgd_ds.universal: {model_file} records no per-group param_shapes; cannot map per-tensor "
            "step counts to parameter names."
        )
    return [list(group.keys()) for group in shapes]


def _vrgd_info(ds_checkpoint, temp_dir: str) -> dict:
    """``{"format", "tensor_step": {name: t}, "skipped_steps"}`` from the shards' dumps."""
    tensor_step: dict[str, float] = {}
    skipped = 0
    for pp in range(ds_checkpoint.pp_degree):
        for tp in range(ds_checkpoint.tp_degree):
            names = None
            wanted, mapped = set(), set()
            for dp in range(ds_checkpoint.dp_degree):
                extra = torch.load(os.path.join(temp_dir, _TMP, f"{pp}.{tp}.{dp}.pt"), weights_only=False)
                if pp == 0 and tp == 0 and dp == 0:
                    skipped = int(extra.get("vrgd", {}).get("skipped_steps", 0))
                for g, state in extra["per_tensor"].items():
                    steps = state.get("tensor_step")
                    if steps is None:
                        continue
                    wanted.add(g)
                    names = names or _group_names(ds_checkpoint, pp, tp)
                    if steps.numel() != len(names[g]):
                        # An elastic checkpoint cuts the last rank's padding off every state
                        # tensor, tensor_step included; the other ranks' copies are whole.
                        continue
                    if not set(state["_slice_names"]) <= set(names[g]):
                        raise ValueError(
                            f"vrgd_ds.universal: param group {g} of pp stage {pp} holds "
                            f"{sorted(set(state['_slice_names']) - set(names[g]))}, which its param_shapes "
                            "do not list: the per-tensor step counts cannot be mapped to parameters."
                        )
                    mapped.add(g)
                    for name, t in zip(names[g], steps.tolist()):
                        if tensor_step.setdefault(name, t) != t:
                            raise ValueError(
                                f"vrgd_ds.universal: the ranks disagree on the step count of {name} "
                                f"({tensor_step[name]} and {t}); the checkpoint is inconsistent."
                            )
            if wanted - mapped:
                raise ValueError(
                    f"vrgd_ds.universal: no whole copy of the per-tensor step counts (tensor_step) of "
                    f"param group(s) {sorted(wanted - mapped)} in the checkpoint; they cannot be mapped "
                    "to parameters."
                )
    return {"format": FORMAT_VERSION, "tensor_step": tensor_step, "skipped_steps": skipped}


def convert(
    input_folder: str,
    output_folder: str,
    *,
    num_extract_workers: int = 4,
    num_merge_workers: int = 2,
    keep_temp_folder: bool = False,
    strict: bool = True,
    inject_missing_state: bool = False,
) -> None:
    """DeepSpeed's ``ds_to_universal`` conversion, keeping every optimizer-state key (see the module
    docstring). Arguments as ``python -m deepspeed.checkpoint.ds_to_universal``'s; the output loads
    with ``"checkpoint": {"load_universal": true}`` on any data-parallel world size."""
    from .deepspeed_glue.versions import require

    require("universal_checkpoint")  # DeepSpeed's ds_to_universal helpers we call (0.19.4-0.19.5 on)
    from deepspeed.checkpoint import DeepSpeedCheckpoint
    from deepspeed.checkpoint import ds_to_universal as dsu

    if not glob.glob(os.path.join(input_folder, "*_optim_states.pt")):
        if glob.glob(os.path.join(input_folder, "*model_states.pt")):
            raise ValueError(
                f"vrgd_ds.universal: {input_folder} holds no ZeRO optimizer files: a ZeRO stage 0 checkpoint. "
                "DeepSpeed "
                "has no universal format for stage 0, and needs none: a stage-0 checkpoint is not partitioned, so "
                "engine.load_checkpoint loads it (VR state included) on any world size, without load_universal."
            )
        raise FileNotFoundError(f"vrgd_ds.universal: no DeepSpeed checkpoint in {input_folder}")
    if dsu._get_zero_stage(dsu._get_optim_files(input_folder)) > 2:
        raise ValueError("vrgd_ds.universal: ZeRO stage 3 checkpoints are not supported (vrgd_ds supports ZeRO 0/1/2).")

    args = argparse.Namespace(
        input_folder=input_folder,
        output_folder=output_folder,
        num_extract_workers=num_extract_workers,
        num_merge_workers=num_merge_workers,
        keep_temp_folder=True,
        strict=strict,
        inject_missing_state=inject_missing_state,
    )
    temp_dir = os.path.join(output_folder, "tmp")
    original = dsu.extract_zero_shards
    dsu.extract_zero_shards = extract_zero_shards  # looked up when DeepSpeed builds its work items
    try:
        dsu.main(args)
    finally:
        dsu.extract_zero_shards = original

    ds_checkpoint = DeepSpeedCheckpoint(input_folder)
    if inject_missing_state:
        dsu._inject_missing_state(ds_checkpoint)
    if ds_checkpoint.tp_degree > 1:
        raise ValueError(
            "vrgd_ds.universal: tensor-parallel checkpoints are not supported (vrgd_ds refuses tensor parallelism)."
        )
    zero_dir = os.path.join(output_folder, "zero")
    slice_shapes = dsu._group_per_tp_shapes(
        dsu._aggregate_autoep_zero12_metadata(ds_checkpoint.model_state_metadata)[0],
        ds_checkpoint.pp_degree,
        ds_checkpoint.tp_degree,
    )
    dsu._do_parallel_work(
        functools.partial(merge_extra_keys, zero_dir, temp_dir, ds_checkpoint.tp_degree),
        list(slice_shapes.items()),
        num_merge_workers,
    )
    torch.save(_vrgd_info(ds_checkpoint, temp_dir), os.path.join(zero_dir, VRGD_FILE))
    if not keep_temp_folder:
        shutil.rmtree(temp_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Loading
def _vr_optimizer(engine):
    from .optimizer import VROptimizer

    opt = getattr(engine, "basic_optimizer", None)
    return opt if isinstance(opt, VROptimizer) else None


def _has_optimizer_state(zero_dir: str, names) -> bool:
    for name in names:
        folder = os.path.join(zero_dir, name)
        if os.path.isdir(folder) and any(f != "fp32.pt" for f in os.listdir(folder)):
            return True
    return False


def _read_info(checkpoint_folder: str, opt, zero_opt) -> dict | None:
    zero_dir = os.path.join(checkpoint_folder, "zero")
    path = os.path.join(zero_dir, VRGD_FILE)
    if not os.path.isfile(path):
        names = [zero_opt.param_names[p] for group in zero_opt.bit16_groups for p in group]
        if opt.vr and _has_optimizer_state(zero_dir, names):
            raise RuntimeError(_STOCK_CONVERTER_MESSAGE.format(folder=checkpoint_folder))
        return None
    info = torch.load(path, weights_only=False)
    if int(info.get("format", 0)) > FORMAT_VERSION:
        raise RuntimeError(
            f"vrgd_ds: {path} has format {info.get('format')}, newer than this vrgd_ds reads "
            f"({FORMAT_VERSION}); upgrade vrgd_ds."
        )
    return info


def _restore_per_tensor_state(opt, zero_opt, info: dict | None, checkpoint_folder: str) -> None:
    tensor_step = (info or {}).get("tensor_step", {})
    for i, group in enumerate(opt.param_groups):
        flat = group["params"][0]
        state = opt.state.get(flat)
        if not state:
            continue
        names = [zero_opt.param_names[p] for p in zero_opt.round_robin_bit16_groups[i]]
        known = [n in tensor_step for n in names]
        if any(known):
            if not all(known):
                missing = [n for n, k in zip(names, known) if not k]
                raise RuntimeError(
                    f"vrgd_ds: the universal checkpoint {checkpoint_folder} has per-tensor step counts "
                    f"for param group {i} but none for {missing}: it was saved with other parameter "
                    "groups; use the same model and parameter groups to resume."
                )
            state["tensor_step"] = torch.tensor(
                [float(tensor_step[n]) for n in names], dtype=torch.float32, device=flat.device
            )
        else:
            state.pop("tensor_step", None)
        if opt.vr and group.get("gsnr_beta") is not None and state.get("step", 0) > 0 and "gsnr_momentum" not in state:
            raise RuntimeError(
                f"vrgd_ds: the universal checkpoint {checkpoint_folder} has no gsnr_momentum for param "
                f"group {i} (saved at step {state.get('step')}; by a run without GSNR momentum?), so the "
                "GSNR momentum would restart and the run would not continue as the saved one. Resume "
                "with the optimizer settings the checkpoint was saved with."
            )
    if info is not None:
        opt.skipped_steps = int(info.get("skipped_steps", opt.skipped_steps))


def installed(engine) -> bool:
    return bool(getattr(engine, "_vrgd_universal_installed", False))


def install(engine) -> None:
    """Make ``engine.load_checkpoint`` with ``"checkpoint": {"load_universal": true}`` restore the VR
    state written by :func:`convert`, or refuse (see the module docstring). Idempotent; a no-op
    unless the engine's optimizer is a VR optimizer."""
    opt = _vr_optimizer(engine)
    if opt is None or installed(engine):
        return
    engine._vrgd_universal_installed = True

    original_load = engine.load_checkpoint

    @functools.wraps(original_load)
    def load_checkpoint(*args, **kwargs):
        if engine.load_universal_checkpoint() and engine.zero_optimization_stage() == 0:
            raise ValueError(
                'vrgd_ds: "checkpoint": {"load_universal": true} at ZeRO stage 0 would not load the model weights '
                "(DeepSpeed 0.19.8 restores them from zero/ at ZeRO 1/2 only). "
                "A stage-0 checkpoint is not partitioned: "
                "remove load_universal and load the ordinary checkpoint, on any world size (VR state included)."
            )
        return original_load(*args, **kwargs)

    engine.load_checkpoint = load_checkpoint

    zero_opt = engine.optimizer
    if not hasattr(zero_opt, "_load_universal_checkpoint") or not hasattr(zero_opt, "round_robin_bit16_groups"):
        return
    original_universal = zero_opt._load_universal_checkpoint

    @functools.wraps(original_universal)
    def _load_universal_checkpoint(checkpoint_folder, *args, **kwargs):
        info = _read_info(checkpoint_folder, opt, zero_opt)  # refuses before anything is loaded
        result = original_universal(checkpoint_folder, *args, **kwargs)
        _restore_per_tensor_state(opt, zero_opt, info, checkpoint_folder)
        return result

    zero_opt._load_universal_checkpoint = _load_universal_checkpoint


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vrgd_ds.universal",
        description="DeepSpeed's ds_to_universal, keeping the VRGD optimizer state (GSNR momentum, momentum "
        "buffers, per-tensor step counts).",
    )
    parser.add_argument("--input_folder", required=True, help="DeepSpeed checkpoint folder (<save_dir>/<tag>)")
    parser.add_argument("--output_folder", required=True, help="universal checkpoint folder (<dir>/<tag>)")
    parser.add_argument("--num_extract_workers", type=int, default=4)
    parser.add_argument("--num_merge_workers", type=int, default=2)
    parser.add_argument("--keep_temp_folder", action="store_true")
    parser.add_argument("--no_strict", dest="strict", action="store_false")
    parser.add_argument(
        "--inject_missing_state",
        action="store_true",
        help="add DeepSpeed's universal_checkpoint_info if the checkpoint lacks it (plain models)",
    )
    a = parser.parse_args(argv)
    convert(
        a.input_folder,
        a.output_folder,
        num_extract_workers=a.num_extract_workers,
        num_merge_workers=a.num_merge_workers,
        keep_temp_folder=a.keep_temp_folder,
        strict=a.strict,
        inject_missing_state=a.inject_missing_state,
    )


if __name__ == "__main__":
    main()
