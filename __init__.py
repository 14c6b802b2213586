"""ComfyUI entry point of the REST talking-heads node pack (classic node API)."""
if __package__:  # pytest, in a clone whose folder name is no identifier (comfyui-rest), imports this file alone
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .nodes.host import install_template_inputs, register_model_folder
    from .nodes.live_routes import register as register_live_routes

    register_model_folder()  # models/rest/ exists in ComfyUI's model folders before any loader lists it
    install_template_inputs()  # the portrait and speech the shipped templates name, in input/ if absent
    register_live_routes()  # the live page and its WebSocket on ComfyUI's own server (/rest/live/)

    WEB_DIRECTORY = "./web"  # the menu entry that opens the live page
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
