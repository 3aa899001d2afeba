"""The page's input components that hand what gradio's own checks refuse to the handler, so the
handler can say what is wrong in the app's words (gradio fails before the handler with a generic
message and a bare "Error" in the status).

Subclasses rather than a patched instance: gradio rebuilds a component a handler has updated (a
model switch updates the gamma slider, an example the image) from its class, per session. Defining
them makes gradio write a type stub, inputs.pyi, beside this file (git-ignored).
"""

from __future__ import annotations

import gradio as gr


class TolerantImage(gr.Image):
    """gr.Image that hands a file Pillow cannot open to the handler as its path (type="filepath")."""

    is_template = True  # the page draws it as a gr.Image

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except Exception:
            return None if payload is None else payload.path


# Each class repeats its few lines: gradio writes a type stub (inputs.pyi) per component class from
# its own body, and a shared mixin would be a name that stub does not define.
class TolerantSlider(gr.Slider):
    """gr.Slider that hands an emptied number box (None) or a typed value out of range as it is."""

    is_template = True

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except Exception:
            return payload


class TolerantNumber(gr.Number):
    """gr.Number that hands a value out of its range as it is."""

    is_template = True

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except Exception:
            return payload
