"""Probe stage (DAG step 1b): decode every catalogued track once with the loader's guards.

Ingest reads headers only; this stage decodes the audio, so truncated files, NaN
samples and digital silence are rejected here with the loader's reason codes, and the
peak and RMS level are recorded. Every model stage depends on it, and the decode lands
in the loader's per-process cache for the stages that follow.
"""
from __future__ import annotations

import numpy as np

from schemas.common import STATUS_OK, STATUS_REJECTED
from schemas.probe import PROBE_SCHEMA
from tasks import audio
from tasks.stage import Stage


class ProbeStage(Stage):
    name = "probe"
    version = "1"
    inputs = ()
    schema = PROBE_SCHEMA

    def process(self, tracks: list[dict]) -> list[dict]:
        rows = []
        for track in tracks:
            row = {"track_id": track["track_id"], "status": STATUS_OK, "reason": None,
                   "duration": track["duration"], "sample_rate": track["sample_rate"],
                   "channels": track["channels"]}
            try:
                # Native rate, native layout: the guards see the samples as stored.
                samples = audio.load_track(track, sr=int(track["sample_rate"]), channels=1,
                                           cfg=self.cfg.audio)
                peak_db, rms_db = audio.check_samples(samples, self.cfg.audio)
                row.update(peak_dbfs=round(peak_db, 2), rms_dbfs=round(rms_db, 2),
                           duration=samples.shape[1] / float(track["sample_rate"]))
            except audio.AudioError as exc:
                row.update(status=STATUS_REJECTED, reason=exc.reason)
            rows.append(row)
        return rows


STAGE = ProbeStage
