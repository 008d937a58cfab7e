#!/usr/bin/python3
"""Assembles the final image's root filesystem from the builder stage: only what runs.

Runs in the Dockerfile's builder stage (full Debian with the image's packages installed):

  mkroot.py ROOT            copy the system part into ROOT
  mkroot.py --app ROOT APP  ROOT has the project in /opt/containerboot and /usr/local/bin/containerboot:
                            import what the program imports (which writes that bytecode, and only that) in a
                            chroot of ROOT, so a module left out fails the build here; then move the project
                            (and its bytecode) out to APP, the image's last layer.

What ROOT gets, and why:
 - the interpreter (python3.11) and the standard library without the parts that cannot run here or that
   nothing running uses (DROP_PY below); the python3-nftables binding (not its optional jsonschema);
 - both iptables variants (xtables-legacy-multi, xtables-nft-multi and every name that leads to them,
   Debian's alternatives included: iptables is iptables-nft, as in Debian) with every xtables extension
   (the iptables commands load them by name, so they cannot be found from the binaries);
 - nft and libnftables (the binding loads libnftables.so.1 itself); ip (iproute2: what tailscaled runs when
   TS_DEBUG_USE_IP_COMMAND is set, and what people reach for in a container); sysctl and /bin/sh (dash)
   for the operator's init container; ldconfig and its cache (ctypes.util.find_library asks `ldconfig -p`);
   a few coreutils and grep for a usable shell;
 - every shared library those load (DT_NEEDED, read from the ELF files here, transitively, as ld.so
   resolves them), plus libgcc_s (glibc loads it to unwind a cancelled thread);
 - CA certificates, /etc/ssl and OpenSSL's /usr/lib/ssl links; passwd/group, name service and network
   databases (nsswitch.conf, protocols, services, ethertypes, iproute2's tables), os-release;
 - /var/lib/dpkg/status with the stanzas of the packages files came from, so image scanners can still tell
   what is inside. dpkg and apt themselves are left out: nothing installs packages at run time.

Everything is done in this one process (no ldd, no dpkg-query per package): under qemu, for the arm
images, each process start costs tens of milliseconds, and a shell version of this took 2.5 minutes there.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import NamedTuple

PY = "python3.11"
MA = sysconfig.get_config_var("MULTIARCH")
LIB = f"/usr/lib/{MA}"
# Where ld.so finds a library by name on Debian (ld.so.conf.d's multiarch directories, then the defaults).
LIBDIRS = (f"/usr/local/lib/{MA}", "/usr/local/lib", f"/lib/{MA}", f"/usr/lib/{MA}", "/lib", "/usr/lib")

# The standard library's parts left out, relative to /usr/lib/python3.11. Development and test tools, the
# GUI and terminal UI, databases whose C libraries are not here, protocols and formats containerboot never
# speaks, asyncio/multiprocessing/concurrent (containerboot uses threads and os.fork), pure-Python
# fallbacks of C modules that are here (_pyio) or of one left out (decimal), codecs of legacy and CJK code
# pages (Kubernetes, tailscaled and the files read are UTF-8 or ASCII). A module containerboot imports
# cannot be in this list unnoticed: the --app step imports everything in a chroot of the result.
DROP_PY = {
    "test", "idlelib", "tkinter", "turtledemo", "turtle.py", "ensurepip", "venv", "distutils", "lib2to3",
    "pydoc_data", "pydoc.py", "unittest", "doctest.py", "pdb.py", "bdb.py", "profile.py", "cProfile.py",
    "pstats.py", "trace.py", "timeit.py", "tabnanny.py", "py_compile.py", "compileall.py", "pyclbr.py",
    "cgitb.py", "cgi.py", f"config-3.11-{MA}", "sqlite3", "dbm", "curses", "asyncio", "multiprocessing",
    "concurrent", "xmlrpc", "wsgiref", "imaplib.py", "nntplib.py", "poplib.py", "smtplib.py", "ftplib.py",
    "telnetlib.py", "mailbox.py", "mailcap.py", "smtpd.py", "asyncore.py", "asynchat.py", "xdrlib.py",
    "sunau.py", "aifc.py", "wave.py", "chunk.py", "sndhdr.py", "imghdr.py", "uu.py", "pipes.py",
    "nturl2path.py", "_osx_support.py", "_aix_support.py", "_bootsubprocess.py", "_pydecimal.py",
    "decimal.py", "_pyio.py", "pickletools.py", "__pycache__",
}
# lib-dynload modules left out: tests, the C parts of the above, and those linking libraries not kept
# (sqlite, ncurses, readline, gdbm/db, nsl, libmpdec, libcrypt).
DROP_DYNLOAD = re.compile(
    r"^(_test|_ctypes_test|_xxtestfuzz|xxlimited|_xxsubinterpreters|_sqlite3|_dbm|_gdbm|_curses|readline|nis"
    r"|ossaudiodev|audioop|_crypt|_codecs_|_multibytecodec|_asyncio|_multiprocessing|_posixshmem|_decimal"
    r"|_lsprof|_tkinter)")
# encodings kept: Unicode, ASCII/Latin-1, the IDNA codec (host names) and the byte-to-byte codecs.
KEEP_ENCODINGS = re.compile(
    r"^(__init__|aliases|utf_8|utf_8_sig|utf_16|utf_16_be|utf_16_le|utf_32|utf_32_be|utf_32_le|ascii|latin_1"
    r"|idna|punycode|raw_unicode_escape|unicode_escape|charmap|hex_codec|base64_codec|zlib_codec|bz2_codec"
    r"|quopri_codec|uu_codec|rot_13|undefined)\.py$")

TOOLS = ("cat", "cp", "env", "head", "id", "ln", "ls", "mkdir", "mv", "readlink", "rm", "sleep", "tail",
         "touch", "uname", "grep")
DATA = (
    "/usr/lib/ssl/cert.pem", "/usr/lib/ssl/certs", "/usr/lib/ssl/openssl.cnf", "/usr/lib/ssl/private",
    "/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow", "/etc/nsswitch.conf", "/etc/host.conf",
    "/etc/gai.conf", "/etc/networks", "/etc/protocols", "/etc/services", "/etc/ethertypes", "/etc/ld.so.conf",
    "/etc/os-release", "/etc/debian_version", "/etc/ca-certificates.conf", "/var/run",
    f"/usr/lib/{PY}/sitecustomize.py",
)
DATA_TREES = ("/etc/ssl", "/usr/share/ca-certificates", "/etc/iproute2", "/etc/ld.so.conf.d",
              "/usr/lib/python3/dist-packages/nftables")

PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_RPATH, DT_RUNPATH = 0, 1, 5, 15, 29


class ElfClass(NamedTuple):
    """Where the fields elf_deps reads sit in one ELF class (32-bit as on i386 and armhf, or 64-bit)."""
    phoff: str       # e_phoff's struct format, read at offset phoff_at
    phoff_at: int
    phnum_at: int    # e_phentsize and e_phnum, two halfwords
    phdr: str        # one program header; phdr_fields index its p_type, p_offset, p_vaddr, p_filesz
    phdr_fields: tuple[int, int, int, int]
    dyn: str         # one dynamic entry: d_tag, d_val


# EI_CLASS (the ELF identification's fifth byte) -> its layout: 32-bit fields are words, and p_flags moves.
ELF_CLASSES = {
    1: ElfClass("<I", 28, 42, "<IIIIIIII", (0, 1, 2, 4), "<iI"),
    2: ElfClass("<Q", 32, 54, "<IIQQQQQQ", (0, 2, 3, 5), "<qQ"),
}


def elf_deps(path: str) -> tuple[list[str], list[str], str | None]:
    """(DT_NEEDED names, RUNPATH/RPATH directories, PT_INTERP) of a little-endian ELF file, 32- or 64-bit."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] not in ELF_CLASSES or data[5] != 1:
        raise ValueError(f"{path}: not a little-endian ELF file")
    cls = ELF_CLASSES[data[4]]
    phoff = struct.unpack_from(cls.phoff, data, cls.phoff_at)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, cls.phnum_at)
    i_type, i_offset, i_vaddr, i_filesz = cls.phdr_fields
    loads, dynamic, interp = [], None, None
    for i in range(phnum):
        fields = struct.unpack_from(cls.phdr, data, phoff + i * phentsize)
        p_type, offset, vaddr, filesz = fields[i_type], fields[i_offset], fields[i_vaddr], fields[i_filesz]
        if p_type == PT_LOAD:
            loads.append((vaddr, offset, filesz))
        elif p_type == PT_DYNAMIC:
            dynamic = (offset, filesz)
        elif p_type == PT_INTERP:
            interp = data[offset:offset + filesz].split(b"\0", 1)[0].decode()
    if dynamic is None:
        return [], [], interp  # static
    step = struct.calcsize(cls.dyn)
    entries = [struct.unpack_from(cls.dyn, data, dynamic[0] + i) for i in range(0, dynamic[1] - step + 1, step)]
    strtab_vaddr = next(v for t, v in entries if t == DT_STRTAB)
    strtab = next(off + strtab_vaddr - va for va, off, size in loads if va <= strtab_vaddr < va + size)

    def string(at: int) -> str:
        start = strtab + at
        return data[start:data.index(b"\0", start)].decode()
    needed, paths = [], []
    for tag, value in entries:
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED:
            needed.append(string(value))
        elif tag in (DT_RPATH, DT_RUNPATH):
            origin = os.path.dirname(path)
            paths += [d.replace("$ORIGIN", origin) for d in string(value).split(":") if d]
    return needed, paths, interp


class Tree:
    def __init__(self) -> None:
        self.paths: set[str] = set()
        self.elves: set[str] = set()

    @staticmethod
    def canon(path: str) -> str:
        """The path with its directories resolved (merged /usr: /lib/x.so is /usr/lib/x.so), last part kept."""
        return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))

    def keep(self, *paths: str) -> None:
        """Keeps each path and, when it is a symlink, every link after it down to the file."""
        for path in paths:
            p = self.canon(path)
            self.paths.add(p)
            while os.path.islink(p):
                p = self.canon(os.path.join(os.path.dirname(p), os.readlink(p)))
                self.paths.add(p)

    def keep_tree(self, top: str) -> None:
        for d, dirs, files in os.walk(top):
            dirs[:] = [x for x in dirs if x != "__pycache__" and not os.path.islink(os.path.join(d, x))]
            self.keep(*(os.path.join(d, f) for f in files))
            self.keep(*(os.path.join(d, x) for x in os.listdir(d) if os.path.islink(os.path.join(d, x))))

    def keep_elf(self, *paths: str) -> None:
        """Keeps ELF files and the shared libraries they load, transitively, found as ld.so finds them."""
        todo = list(paths)
        while todo:
            path = todo.pop()
            self.keep(path)
            real = os.path.realpath(path)
            if real in self.elves:
                continue
            self.elves.add(real)
            needed, runpath, interp = elf_deps(real)
            if interp:
                self.keep(interp)
            for name in needed:
                found = next((os.path.join(d, name) for d in (*runpath, *LIBDIRS)
                              if os.path.exists(os.path.join(d, name))), None)
                if found is None:
                    raise SystemExit(f"mkroot: {real} needs {name}, which is nowhere in {LIBDIRS}")
                todo.append(found)


def stdlib(tree: Tree) -> None:
    top = f"/usr/lib/{PY}"
    for d, dirs, files in os.walk(top):
        rel = os.path.relpath(d, top)
        if rel == "lib-dynload":
            dirs[:] = []
            tree.keep_elf(*(os.path.join(d, f) for f in files if f.endswith(".so") and not DROP_DYNLOAD.match(f)))
            continue
        if rel == ".":
            dirs[:] = [x for x in dirs if x not in DROP_PY]
            files = [f for f in files if f not in DROP_PY]
        else:
            dirs[:] = [x for x in dirs if x != "__pycache__"]
        if rel == "encodings":
            files = [f for f in files if KEEP_ENCODINGS.match(f)]
        tree.keep(*(os.path.join(d, f) for f in files))


def dpkg_status(tree: Tree, root: str) -> int:
    """Writes ROOT/var/lib/dpkg/status with the stanzas of the packages that own a kept file."""
    kept = {p for p in tree.paths if not os.path.isdir(p)}
    owners = set()
    info = Path("/var/lib/dpkg/info")
    for listing in info.glob("*.list"):
        for line in listing.read_text(errors="replace").splitlines():
            # dpkg records paths from before merged /usr: /lib/x.so for /usr/lib/x.so
            path = re.sub(r"^/(bin|sbin|lib|lib64)/", r"/usr/\1/", line)
            if path in kept or line in kept:
                owners.add(listing.stem.split(":", 1)[0])
                break
    stanzas = Path("/var/lib/dpkg/status").read_text().split("\n\n")
    out = [s.strip("\n") for s in stanzas if (m := re.search(r"^Package: (\S+)$", s, re.M)) and m[1] in owners]
    status = Path(root, "var/lib/dpkg/status")
    status.parent.mkdir(parents=True, exist_ok=True)
    status.write_text("\n\n".join(out) + "\n")
    return len(out)


def system(root: str) -> None:
    tree = Tree()
    tree.paths.update(f for f in ("/bin", "/sbin", "/lib", "/lib64") if os.path.islink(f))  # merged /usr
    tools = [shutil.which(t) for t in ("ip", *TOOLS)]
    if None in tools:
        raise SystemExit(f"mkroot: missing one of ip, {', '.join(TOOLS)}")
    tree.keep_elf(f"/usr/bin/{PY}", "/usr/bin/dash", "/usr/sbin/nft", "/usr/sbin/sysctl", "/usr/sbin/ldconfig",
                  *(t for t in tools if t), "/usr/sbin/xtables-legacy-multi", "/usr/sbin/xtables-nft-multi",
                  *(str(p) for p in sorted(Path(LIB, "xtables").glob("*.so"))),
                  f"{LIB}/libnftables.so.1", f"{LIB}/libgcc_s.so.1")
    tree.keep("/usr/bin/python3", "/usr/bin/sh")
    # every iptables/ip6tables/ebtables/arptables name, through /etc/alternatives, that runs one of the two
    multis = {"/usr/sbin/xtables-legacy-multi", "/usr/sbin/xtables-nft-multi"}
    tree.keep(*(str(p) for p in Path("/usr/sbin").iterdir() if os.path.realpath(p) in multis))
    stdlib(tree)
    for top in DATA_TREES:
        tree.keep_tree(top)
    tree.keep(*(p for p in DATA if os.path.lexists(p)))

    Path(root).mkdir(parents=True, exist_ok=True)
    listing = "".join(p.lstrip("/") + "\n" for p in sorted(tree.paths))
    pack = subprocess.Popen(["tar", "-C", "/", "--no-recursion", "-cf", "-", "-T", "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    unpack = subprocess.Popen(["tar", "-C", root, "-xpf", "-"], stdin=pack.stdout)
    assert pack.stdin and pack.stdout
    pack.stdout.close()
    pack.stdin.write(listing.encode())
    pack.stdin.close()
    if pack.wait() or unpack.wait():
        raise SystemExit("mkroot: tar failed")
    for d in ("tmp", "var/tmp", "root", "run", "var/lib", "usr/local/bin", "usr/local/sbin", "proc", "sys", "dev"):
        Path(root, d).mkdir(parents=True, exist_ok=True)
    os.chmod(f"{root}/tmp", 0o1777)
    os.chmod(f"{root}/var/tmp", 0o1777)
    os.chmod(f"{root}/root", 0o700)
    subprocess.run(["ldconfig", "-r", root], check=True)
    packages = dpkg_status(tree, root)
    print(f"mkroot: {len(tree.paths)} paths, {len(tree.elves)} ELF files, {packages} packages")


# Modules the program reaches on some path but not at import time of its own modules (lazy imports).
EXTRA_IMPORTS = ("ssl", "http.client", "http.server", "socketserver", "urllib.request", "urllib.parse", "ctypes",
                 "ctypes.util", "json", "queue", "difflib", "codecs", "base64", "encodings.idna", "nftables",
                 "tempfile", "shutil")


def app(root: str, out: str) -> None:
    lib = Path(root, "opt/containerboot/lib")
    mods = sorted(".".join(p.relative_to(lib).with_suffix("").parts).removesuffix(".__init__")
                  for pkg in ("containerboot", "firewall") for p in (lib / pkg).rglob("*.py")
                  if p.name != "__main__.py")
    py = ["chroot", root, "/usr/bin/python3", "-sE", "-X", "importtime"]
    runs = [
        # every module of the project and the extras, then the program as users run it
        py + ["-c", "import sys; sys.path.insert(0, '/opt/containerboot/lib'); import "
              + ", ".join(mods + list(EXTRA_IMPORTS))],
        py + ["/usr/local/bin/containerboot", "plan", "--tailnet-ip", "100.64.0.1"],
        py + ["/usr/local/bin/containerboot", "--help"],
    ]
    env = {"PATH": os.environ["PATH"], "TS_TEST_FAKE_NETFILTER": "true", "TS_USERSPACE": "false",
           "TS_DEST_IP": "10.0.0.5"}
    imports = 0
    for argv in runs:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        lines = proc.stderr.splitlines()
        if proc.returncode:
            raise SystemExit("mkroot: " + " ".join(argv[2:]) + " failed:\n"
                             + "\n".join(line for line in lines if not line.startswith("import time:")))
        imports += sum(line.startswith("import time:") for line in lines)
    pycs = sum(1 for _ in Path(root).rglob("*.pyc"))
    print(f"mkroot: {imports} imports traced, {pycs} modules compiled")
    Path(out, "opt").mkdir(parents=True)
    Path(out, "usr/local/bin").mkdir(parents=True)
    Path(out, "tailscale").mkdir(parents=True)
    shutil.move(f"{root}/opt/containerboot", f"{out}/opt/containerboot")
    shutil.move(f"{root}/usr/local/bin/containerboot", f"{out}/usr/local/bin/containerboot")
    # Old operator manifests and user pods start the image with /tailscale/run.sh; upstream keeps that path.
    os.symlink("/usr/local/bin/containerboot", f"{out}/tailscale/run.sh")


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--app":
        app(argv[1], argv[2])
    elif len(argv) == 1 and not argv[0].startswith("-"):
        system(argv[0])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
