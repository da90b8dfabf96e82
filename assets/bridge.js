// Plotly click -> Python: gr.Plot has no click event, so every half second this attaches a
// plotly_click listener to each newly drawn figure and writes the clicked point's customdata
// (plus a nonce, so clicking the same node twice still counts as a change) into a hidden textbox
// whose .change event runs the Python handler.
() => {
  const bridges = [["structure-graph", "structure-click"]];
  const attach = () => {
    for (const [plotId, boxId] of bridges) {
      document.querySelectorAll(`#${plotId} .js-plotly-plot`).forEach((plot) => {
        if (plot.dataset.peBridged === "1" || typeof plot.on !== "function") return;
        plot.dataset.peBridged = "1";
        plot.on("plotly_click", (event) => {
          const point = event && event.points && event.points[0];
          if (!point || point.customdata === undefined || point.customdata === null) return;
          const box = document.querySelector(`#${boxId} textarea, #${boxId} input`);
          if (!box) return;
          box.value = `${point.customdata}|${Date.now()}`;
          box.dispatchEvent(new Event("input", { bubbles: true }));
        });
      });
    }
  };
  setInterval(attach, 500);
}
