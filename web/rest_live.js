// REST live page from the ComfyUI UI: a "REST > Live talking head" menu entry (and a command for the
// command palette / keybindings) that opens the pack's live page, served by ComfyUI itself, in a new tab.
import { app } from "../../scripts/app.js";

function openLivePage() {
  window.open(new URL("rest/live/", document.baseURI).href, "_blank", "noopener");
}

app.registerExtension({
  name: "REST.LivePage",
  commands: [{ id: "REST.OpenLivePage", label: "Live talking head (REST)", icon: "pi pi-microphone",
               function: openLivePage }],
  menuCommands: [{ path: ["REST"], commands: ["REST.OpenLivePage"] }],
});
