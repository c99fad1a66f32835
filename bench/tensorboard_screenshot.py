"""Serve TensorBoard on a log folder and screenshot its dashboards in headless Chromium.

What a reviewer sees in a browser, checked without one: the HParams table, Time Series,
Scalars, Custom Scalars (train vs val on one chart) and Images, one PNG each.

Needs Chromium and Node's playwright-core (outside the repository), e.g. on Debian:

    apt-get install -y chromium
    mkdir -p /tmp/pw && (cd /tmp/pw && npm i playwright-core)
    resnet-train -m optimizer=adam,sgd model=resnet20 dataset=shapes dataset.image_size=16 \
        dataset.num_train=2000 dataset.num_val=500 trainer.epochs=4 output_root=/tmp/tb-demo
    python bench/tensorboard_screenshot.py --logdir /tmp/tb-demo --out /tmp/shots --node-modules /tmp/pw/node_modules

The README's pictures (docs/img/) were taken this way: hparams.png and custom_scalars.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# (file name, TensorBoard route): one screenshot each.
PAGES = (
    ("hparams", "#hparams"),
    ("timeseries", "#timeseries"),
    ("scalars", "#scalars"),
    ("custom_scalars", "#custom_scalars"),
    ("images", "#images"),
)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

_JS = r"""
const { chromium } = require('playwright-core');
const cfg = JSON.parse(process.argv[2]);
(async () => {
  // A fresh profile folder per call (playwright passes it to Chromium as --user-data-dir).
  const browser = await chromium.launchPersistentContext(cfg.profile, { executablePath: cfg.chromium, args: cfg.args,
    viewport: { width: cfg.width, height: cfg.height } });
  const page = await browser.newPage();
  for (const [name, route] of cfg.pages) {
    await page.goto(cfg.url + '/' + route, { waitUntil: 'load' });
    await page.waitForTimeout(cfg.settle_ms);
    await page.screenshot({ path: cfg.out + '/' + name + '.png', fullPage: false });
    console.log('wrote ' + cfg.out + '/' + name + '.png');
  }
  await browser.close();
})().catch((e) => { console.error(e); process.exit(1); });
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_served(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Return once url answers HTTP 200; fail if the server exits or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"tensorboard exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)  # polling a server that is starting, bounded by the deadline
    raise SystemExit(f"tensorboard did not answer at {url} within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> None:
    """Serve --logdir with TensorBoard on 127.0.0.1 and write one screenshot per dashboard into --out."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--logdir", required=True)
    ap.add_argument("--out", required=True, help="folder for the PNGs")
    ap.add_argument("--node-modules", default=os.environ.get("PLAYWRIGHT_NODE_MODULES", "/tmp/pw/node_modules"),
                    help="the node_modules folder holding playwright-core")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--tensorboard", default=str(Path(sys.executable).parent / "tensorboard"))
    ap.add_argument("--pages", default=",".join(p[0] for p in PAGES), help="which dashboards, comma-separated")
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--settle-s", type=float, default=6.0, help="seconds each page gets to load its data")
    args = ap.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([args.tensorboard, "--logdir", str(Path(args.logdir).resolve()), "--host", "127.0.0.1",
                               "--port", str(port), "--reload_interval", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_served(url + "/data/logdir", server)
        wanted = set(args.pages.split(","))
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "shoot.js"
            script.write_text(_JS)
            cfg = {"chromium": args.chromium, "args": CHROMIUM_ARGS, "profile": str(Path(tmp) / "profile"),
                   "url": url, "out": str(out), "width": args.width, "height": args.height,
                   "settle_ms": int(args.settle_s * 1000),
                   "pages": [[name, route] for name, route in PAGES if name in wanted]}
            env = {**os.environ, "NODE_PATH": args.node_modules}
            subprocess.run(["node", str(script), json.dumps(cfg)], check=True, env=env, timeout=600)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
