import { useEffect, useRef } from "preact/hooks";
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import type { HistorySample } from "./api";
import { bytes } from "./util";

function cssVar(name: string): string {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || "#888";
}

/** Stored and logical bytes of a repository over time (one sample a day). */
export function UsageChart({ samples, label }: { samples: HistorySample[]; label: string }) {
  const box = useRef<HTMLDivElement>(null);
  useEffect(() => {
    const el = box.current;
    if (!el || samples.length === 0) return;
    const x = samples.map((s) => Date.parse(`${s.day}T23:59:59Z`) / 1000);
    const fg = cssVar("--muted");
    const grid = cssVar("--line");
    const axis = { stroke: fg, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 } };
    const plot = new uPlot(
      {
        width: Math.max(300, el.clientWidth),
        height: 220,
        title: label,
        // One day alone: a range of three days around it, not the scale's default of years.
        scales: {
          x: {
            time: true,
            range: (_u, min, max) => (min === max ? [min - 86_400, max + 86_400] : [min, max]),
          },
        },
        series: [
          {},
          {
            label: "stored",
            stroke: cssVar("--accent"),
            fill: `${cssVar("--accent")}33`,
            value: (_u, v) => bytes(v),
          },
          // Logical bytes are many times the stored ones: an axis of their own, on the right.
          { label: "logical", scale: "logical", stroke: cssVar("--warn"), value: (_u, v) => bytes(v) },
        ],
        axes: [
          axis,
          { ...axis, label: "stored", size: 80, values: (_u, vals) => vals.map((v) => bytes(v)) },
          {
            ...axis,
            label: "logical",
            scale: "logical",
            side: 1,
            size: 80,
            grid: { show: false },
            values: (_u, vals) => vals.map((v) => bytes(v)),
          },
        ],
      },
      [x, samples.map((s) => s.storedBytes), samples.map((s) => s.logicalBytes)],
      el,
    );
    const resize = () => plot.setSize({ width: Math.max(300, el.clientWidth), height: 220 });
    window.addEventListener("resize", resize);
    return () => {
      window.removeEventListener("resize", resize);
      plot.destroy();
    };
  }, [samples, label]);
  return (
    <div class="chart" ref={box} role="img" aria-label={`${label}: stored and logical bytes over time`} />
  );
}
