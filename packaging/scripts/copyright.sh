#!/bin/sh
# Print a machine-readable debian/copyright for the package: Portunus itself, then
# one paragraph per bundled Python distribution with the license its metadata
# declares.  Each one's own license files stay in its .dist-info directory.
# Usage: copyright.sh /path/to/staged/opt/portunus
set -eu
venv=$1
year=$(date -u -d "@${SOURCE_DATE_EPOCH:-$(date +%s)}" +%Y)
cat <<HEAD
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: portunus
Comment: The package bundles its Python dependencies in a virtual environment
 under /opt/portunus (Debian 12's python3-* packages are too old). Their own
 license texts are installed next to them, in
 /opt/portunus/lib/python3.11/site-packages/*.dist-info/.

Files: *
Copyright: $year The Portunus authors
License: AGPL-3.0-only
 This program is free software: you can redistribute it and/or modify it under
 the terms of the GNU Affero General Public License as published by the Free
 Software Foundation, version 3.
 .
 This program is distributed in the hope that it will be useful, but WITHOUT ANY
 WARRANTY; without even the implied warranty of MERCHANTABILITY or FITNESS FOR A
 PARTICULAR PURPOSE. See the GNU Affero General Public License for more details.
 .
 The full text is at https://www.gnu.org/licenses/agpl-3.0.txt
HEAD
/usr/bin/python3.11 - "$venv" <<'PY'
import sys
from email.parser import Parser
from pathlib import Path

# Trove classifiers of older metadata, as SPDX short names.
SPDX = {"MIT License": "MIT", "Apache Software License": "Apache-2.0",
        "Python Software Foundation License": "PSF-2.0", "ISC License (ISCL)": "ISC"}

site = next(Path(sys.argv[1]).glob("lib/python3.*/site-packages"))
for info in sorted(site.glob("*.dist-info")):
    meta = Parser().parsestr((info / "METADATA").read_text(encoding="utf-8"), headersonly=True)
    name = meta["Name"]
    if name.lower() == "portunus":
        continue
    lic = meta.get("License-Expression") or ""
    if not lic:
        classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or []
                       if c.startswith("License ::") and "OSI Approved" != c.split("::")[-1].strip()]
        raw = (meta.get("License") or "").strip().splitlines()
        lic = " or ".join(SPDX.get(c, c) for c in classifiers) or (raw[0] if raw and len(raw[0]) < 80 else "see its license files")
    files = sorted(str(p.relative_to(info)) for p in info.rglob("*")
                   if p.is_file() and ("licen" in p.name.lower() or "copying" in p.name.lower()
                                       or "licenses" in p.parts))
    top = {line.split("/")[0].split(",")[0] for line in
           (info / "RECORD").read_text(encoding="utf-8").splitlines()
           if line and not line.startswith(("../", "__pycache__"))}
    top.discard(info.name)
    paths = " ".join(f"opt/portunus/{site.relative_to(sys.argv[1]).as_posix()}/{t}"
                     for t in sorted(top)) if top else "*"
    print()
    print(f"Files: {paths}")
    print(f"Copyright: the {name} authors (version {meta['Version']})")
    print(f"License: {lic}")
    print(f" Bundled {name} {meta['Version']}; license text: "
          f"{info.name}/{', '.join(files) if files else '(none shipped)'}")
PY
