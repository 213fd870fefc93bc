"""Checkpoints: DeepSpeed's, one tag per (phase, step), the loop's running state as client state."""

from __future__ import annotations

from pathlib import Path

from pretraining import InputError


def checkpoint_tag(phase: int, step: int) -> str:
    return f"phase{phase}-step{step:06d}"


def parse_tag(tag: str) -> tuple[int, int]:
    phase, step = tag.split("-")
    return int(phase.removeprefix("phase")), int(step.removeprefix("step"))


def latest_checkpoint(checkpoints: Path) -> str | None:
    latest = checkpoints / "latest"  # written by DeepSpeed's save_checkpoint
    return latest.read_text().strip() if latest.exists() else None


def save(engine, checkpoints: Path, phase: int, step: int, **state):
    """A DeepSpeed checkpoint (every rank writes its ZeRO partition); ``state`` rides along as client state."""
    engine.save_checkpoint(
        str(checkpoints), tag=checkpoint_tag(phase, step), client_state=dict(state, phase=phase, step=step)
    )


def load(engine, checkpoints: Path, tag: str, **kwargs) -> dict:
    """Load a checkpoint into the engine and return its client state; a clear error if it is not there."""
    path, state = engine.load_checkpoint(str(checkpoints), tag=tag, **kwargs)
    if path is None:  # DeepSpeed only warns
        raise InputError(
            f"checkpoint {tag} not found in {checkpoints} (it is needed to continue); run without "
            f"--resume into a new --output-dir to start over."
        )
    return state
