"""The Gradio app's logic, apart from its layout (app.py): `handlers` (what each event does) and
`models_folder` (the hot-loaded checkpoints folder)."""
