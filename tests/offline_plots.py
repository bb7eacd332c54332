"""The offline HTML template for `dvc plots show`: vega, vega-lite and vega-embed inlined.

DVC's own page loads those three libraries from a CDN, so offline or behind a firewall its charts
are blank. .dvc/config points `plots.html_template` at .dvc/plots/offline.html, built here from
the builds in .dvc/plots/vendor/ (from the npm registry, pinned to the versions DVC's renderer
names; BSD-3-Clause, their licences beside them). The page keeps DVC's placeholders
({plot_divs}, {refresh_tag}) and leaves out {scripts}, where DVC would put its CDN links.

    python -m tests.offline_plots --write     # rebuild the template after changing a vendored file
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLOTS = ROOT / ".dvc/plots"
TEMPLATE = PLOTS / "offline.html"
VENDORED = (("vega", "5.20.2"), ("vega-lite", "5.2.0"), ("vega-embed", "6.18.2"))  # load order


def inline_script(name: str) -> str:
    code = (PLOTS / "vendor" / f"{name}.min.js").read_text(encoding="utf-8")
    # The source map is not shipped: drop its reference rather than leave a broken link.
    code = "\n".join(line for line in code.splitlines() if not line.startswith("//# sourceMappingURL="))
    return f"<script>\n{code}\n</script>"


def build_template() -> str:
    versions = ", ".join(f"{name} {version}" for name, version in VENDORED)
    scripts = "\n".join(inline_script(name) for name, _ in VENDORED)
    return f"""<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC plots</title>
    <!-- {versions} inlined (BSD-3-Clause, see .dvc/plots/vendor/): no network needed -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write"]:
        TEMPLATE.write_text(build_template(), encoding="utf-8")
        print(f"wrote {TEMPLATE}")
    else:
        print(build_template())
