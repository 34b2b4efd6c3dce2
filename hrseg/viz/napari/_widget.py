"""Dock widget "Synthesize tumours" (npe2 widget contribution): see ``_synth.synthesize``."""
from __future__ import annotations

import napari
from magicgui.widgets import (
    ComboBox,
    Container,
    FloatSlider,
    FloatSpinBox,
    Label,
    PushButton,
    SpinBox,
)

from hrseg.viz.napari._case import LABEL_COLOURS
from hrseg.viz.napari._synth import SYNTH_CT, SYNTH_LABELS, synthesize


def layers_of(viewer, kind, exclude):
    return [(layer.name, layer) for layer in viewer.layers
            if isinstance(layer, kind) and layer.name not in exclude
            and (layer.metadata.get("hrseg", {}).get("role") != "prediction")]


class SynthesizeWidget(Container):
    """Seed, probability and liver-share inputs; adds/updates the layers "synthetic CT" and
    "synthetic labels" from the chosen CT and labels layers."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.ct = ComboBox(label="CT", choices=lambda _w: layers_of(
            self.viewer, napari.layers.Image, {SYNTH_CT}))
        self.labels = ComboBox(label="labels", choices=lambda _w: layers_of(
            self.viewer, napari.layers.Labels, {SYNTH_LABELS}))
        self.seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1)
        self.probability = FloatSlider(label="probability", value=1.0, min=0.0, max=1.0,
                                       step=0.05)
        self.fraction_min = FloatSpinBox(label="liver share min", value=0.05, min=0.0,
                                         max=1.0, step=0.01)
        self.fraction_max = FloatSpinBox(label="liver share max", value=0.25, min=0.0,
                                         max=1.0, step=0.01)
        self.button = PushButton(text="Synthesize")
        self.status = Label(value="")
        self.extend([self.ct, self.labels, self.seed, self.probability, self.fraction_min,
                     self.fraction_max, self.button, self.status])
        self.button.changed.connect(lambda *_: self.run(block=False))
        events = self.viewer.layers.events
        for ev in (events.inserted, events.removed, events.moved):
            ev.connect(lambda *_: self.reset_choices())
        self.busy = False
        self.reset_choices()

    def run(self, block: bool = True):
        """Synthesize on the chosen layers; ``block=False`` (the button) runs in a thread."""
        ct, labels = self.ct.value, self.labels.value
        if ct is None or labels is None:
            self.status.value = "open a case first (CT image + labels)"
            return
        args = (ct.data, labels.data, self.seed.value, self.probability.value,
                (self.fraction_min.value, self.fraction_max.value))
        self.busy = True
        self.button.enabled = False
        self.status.value = "synthesizing…"
        if block:
            try:
                self._show(ct, labels, synthesize(*args))
            except Exception as e:  # shown in the widget, then re-raised
                self._fail(e)
                raise
            return
        from napari.qt.threading import create_worker
        worker = create_worker(synthesize, *args)
        worker.returned.connect(lambda out: self._show(ct, labels, out))
        worker.errored.connect(self._fail)
        worker.start()

    def _fail(self, err):
        self.busy = False
        self.button.enabled = True
        self.status.value = f"error: {err}"

    def _show(self, ct, labels, out):
        new_ct, new_lab, applied = out
        self.busy = False
        self.button.enabled = True
        if not applied:
            self.status.value = (f"seed {self.seed.value}: not applied "
                                 f"(probability {self.probability.value:.2f})")
            return
        meta = {"hrseg": {"role": "synthetic", "seed": self.seed.value}}
        if SYNTH_CT in self.viewer.layers:
            self.viewer.layers[SYNTH_CT].data = new_ct
        else:
            self.viewer.add_image(new_ct, name=SYNTH_CT, scale=ct.scale,
                                  translate=ct.translate, colormap=ct.colormap,
                                  contrast_limits=ct.contrast_limits, metadata=meta)
        if SYNTH_LABELS in self.viewer.layers:
            self.viewer.layers[SYNTH_LABELS].data = new_lab
        else:
            self.viewer.add_labels(new_lab, name=SYNTH_LABELS, scale=labels.scale,
                                   translate=labels.translate, colormap=dict(LABEL_COLOURS),
                                   opacity=labels.opacity, metadata=meta)
        n = int((new_lab == 2).sum())
        self.status.value = f"seed {self.seed.value}: {n} tumour voxels"
