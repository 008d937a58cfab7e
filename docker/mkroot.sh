#!/bin/bash
# Runs in the Dockerfile's builder stage (full Debian with the image's packages installed) and assembles
# the final image's root filesystem from it: only what runs, with the libraries it needs (ldd).
#
#   mkroot.sh ROOT            copy the system part into ROOT
#   mkroot.sh --app ROOT APP  ROOT has the project in /opt/containerboot and /usr/local/bin/containerboot:
#                             import what the program imports (which writes that bytecode, and only that),
#                             in a chroot of ROOT, so a module left out fails the build here; then move the
#                             project (and its bytecode) out to APP, the image's last layer.
#
# What ROOT gets, and why:
#  - the interpreter (python3.11) and the standard library without the parts that cannot run here or that
#    nothing running uses (DROP_PY below); the python3-nftables binding;
#  - both iptables variants (xtables-legacy-multi, xtables-nft-multi and every name that leads to them,
#    Debian's alternatives included: iptables is iptables-nft, as in Debian) with every xtables extension
#    (the iptables commands and python-iptables load them by name, so they cannot be told apart by ldd);
#  - nft and libnftables (the binding loads libnftables.so.1 itself); ip (iproute2: what tailscaled runs
#    when TS_DEBUG_USE_IP_COMMAND is set, and what people reach for in a container); sysctl and /bin/sh
#    (dash) for the operator's init container; ldconfig and its cache (ctypes.util.find_library and
#    python-iptables ask `ldconfig -p` / `ldconfig -N -v` where libraries are); a few coreutils and grep for
#    a usable shell;
#  - every shared library those need, found with ldd, plus libgcc_s (glibc loads it to unwind a thread);
#  - CA certificates, /etc/ssl, OpenSSL's /usr/lib/ssl links; passwd/group, name service and network
#    databases (nsswitch.conf, protocols, services, ethertypes, iproute2's tables), os-release;
#  - /var/lib/dpkg/status with the stanzas of the packages files came from, so image scanners can still
#    tell what is inside. dpkg and apt themselves are left out: nothing installs packages at run time.
set -euo pipefail
export LC_ALL=C

PY=python3.11
MA=$($PY -c 'import sysconfig; print(sysconfig.get_config_var("MULTIARCH"))')
LIB=/usr/lib/$MA

# The standard library's parts left out, relative to /usr/lib/python3.11. Development and test tools, the
# GUI and terminal UI, databases whose C libraries are not here, protocols and formats containerboot never
# speaks, asyncio/multiprocessing (containerboot uses threads and os.fork), pure-Python fallbacks of C
# modules that are here (_pydecimal, _pyio), codecs for legacy and CJK code pages (Kubernetes, tailscaled
# and the files we read are UTF-8 or ASCII). A module containerboot imports can never be in this list
# unnoticed: the --app step below imports everything in a chroot of the result and fails the build.
DROP_PY=(
  test idlelib tkinter turtledemo turtle.py ensurepip venv distutils lib2to3 pydoc_data pydoc.py
  unittest doctest.py pdb.py bdb.py profile.py cProfile.py pstats.py trace.py timeit.py tabnanny.py
  py_compile.py compileall.py pyclbr.py cgitb.py cgi.py
  "config-3.11-$MA" sqlite3 dbm curses
  asyncio multiprocessing concurrent xmlrpc wsgiref imaplib.py nntplib.py poplib.py smtplib.py ftplib.py
  telnetlib.py mailbox.py mailcap.py smtpd.py asyncore.py asynchat.py xdrlib.py sunau.py aifc.py wave.py
  chunk.py sndhdr.py imghdr.py uu.py pipes.py nturl2path.py _osx_support.py _aix_support.py _bootsubprocess.py
  _pydecimal.py decimal.py _pyio.py pickletools.py
)
# lib-dynload modules left out: tests, the above's C parts, and those linking libraries not kept
# (sqlite, ncurses, readline, gdbm/db, nsl, libmpdec, libcrypt).
DROP_DYNLOAD='^(_test|_ctypes_test|_xxtestfuzz|xxlimited|_xxsubinterpreters|_sqlite3|_dbm|_gdbm|_curses|readline|nis|ossaudiodev|audioop|_crypt|_codecs_|_multibytecodec|_asyncio|_multiprocessing|_posixshmem|_decimal|_lsprof|_tkinter)'
# encodings kept: Unicode, ASCII/Latin-1, the IDNA codec (host names) and the byte-to-byte codecs.
KEEP_ENCODINGS='^(__init__|aliases|utf_8|utf_8_sig|utf_16|utf_16_be|utf_16_le|utf_32|utf_32_be|utf_32_le|ascii|latin_1|idna|punycode|raw_unicode_escape|unicode_escape|charmap|hex_codec|base64_codec|zlib_codec|bz2_codec|quopri_codec|uu_codec|rot_13|undefined)\.py$'

TOOLS=(cat cp env head id ln ls mkdir mv readlink rm sleep tail touch uname grep)

list=$(mktemp)
add() { printf '%s\n' "$@" >>"$list"; }

# A path with its directories resolved (merged /usr: /lib/x.so is /usr/lib/x.so), its last part kept.
canon() {
  local d
  d=$(readlink -f "$(dirname "$1")")
  printf '%s/%s\n' "${d%/}" "$(basename "$1")"
}

# Keeps a path and, when it is a symlink, every link after it down to the file.
keep() {
  local p t
  for p; do
    p=$(canon "$p")
    add "$p"
    while [ -L "$p" ]; do
      t=$(readlink "$p")
      case $t in /*) p=$(canon "$t") ;; *) p=$(canon "$(dirname "$p")/$t") ;; esac
      add "$p"
    done
  done
}

# Keeps ELF files and the shared libraries they load, transitively (ldd prints the whole closure).
keep_elf() {
  local f lib
  for f; do
    keep "$f"
    while read -r lib; do
      keep "$lib"
    done < <(ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
  done
}

system() {
  local root=$1 f
  # merged /usr
  for f in /bin /sbin /lib /lib64 /lib32 /libx32; do [ -L "$f" ] && add "$f"; done

  local elves=()
  elves+=("/usr/bin/$PY" /usr/bin/dash /usr/sbin/nft /usr/sbin/sysctl /usr/sbin/ldconfig "$(command -v ip)")
  for f in "${TOOLS[@]}"; do elves+=("$(command -v "$f")"); done
  elves+=(/usr/sbin/xtables-legacy-multi /usr/sbin/xtables-nft-multi "$LIB"/xtables/*.so)
  elves+=("$(readlink -f "$LIB/libnftables.so.1")" "$(readlink -f "$LIB/libgcc_s.so.1")")
  for f in "/usr/lib/$PY"/lib-dynload/*.so; do
    basename "$f" | grep -Eq "$DROP_DYNLOAD" || elves+=("$f")
  done
  keep_elf "${elves[@]}"
  keep /usr/bin/python3 /usr/bin/sh "$LIB/libnftables.so.1" "$LIB/libgcc_s.so.1"
  # every iptables/ip6tables/ebtables/arptables name, through /etc/alternatives, that runs one of the two
  for f in /usr/sbin/*; do
    case $(readlink -f "$f") in /usr/sbin/xtables-legacy-multi | /usr/sbin/xtables-nft-multi) keep "$f" ;; esac
  done

  # the standard library, less DROP_PY, less bytecode (the --app step writes what is imported)
  local prune=() d
  for d in "${DROP_PY[@]}"; do prune+=(-path "/usr/lib/$PY/$d" -prune -o); done
  find "/usr/lib/$PY" "${prune[@]}" -path "/usr/lib/$PY/lib-dynload" -prune -o -name __pycache__ -prune -o \
    -path "/usr/lib/$PY/encodings/*" -prune -o \( -type f -o -type l \) -print >>"$list"
  for f in "/usr/lib/$PY"/encodings/*.py; do
    basename "$f" | grep -Eq "$KEEP_ENCODINGS" && add "$f"
  done
  find /usr/lib/python3/dist-packages/nftables -name __pycache__ -prune -o -type f -print >>"$list"
  keep "/usr/lib/$PY/sitecustomize.py"

  # data
  find /etc/ssl /usr/share/ca-certificates /etc/iproute2 \( -type f -o -type l \) -print >>"$list"
  for f in /usr/lib/ssl/cert.pem /usr/lib/ssl/certs /usr/lib/ssl/openssl.cnf /usr/lib/ssl/private \
           /etc/passwd /etc/group /etc/shadow /etc/gshadow /etc/nsswitch.conf /etc/host.conf /etc/gai.conf \
           /etc/networks /etc/protocols /etc/services /etc/ethertypes /etc/ld.so.conf /etc/ld.so.conf.d \
           /etc/ld.so.conf.d/* /etc/os-release /etc/debian_version /etc/ca-certificates.conf /var/run; do
    [ -e "$f" ] || [ -L "$f" ] && keep "$f"
  done

  mkdir -p "$root"
  sed 's#^/##' "$list" | sort -u | tar -C / --no-recursion -cf - -T - | tar -C "$root" -xpf -
  mkdir -p "$root"/{tmp,var/tmp,root,run,var/lib,usr/local/bin,usr/local/sbin,proc,sys,dev,etc}
  chmod 1777 "$root/tmp" "$root/var/tmp"
  chmod 0700 "$root/root"
  ldconfig -r "$root"

  # dpkg's record of the packages the files came from (paths as dpkg knows them, before merged /usr)
  local pkg kept
  kept=$(mktemp)
  while read -r f; do [ -d "$f" ] || echo "$f"; done <"$list" >"$kept.files"
  sed -E 's#^/usr/(bin|sbin|lib|lib64)/#/\1/#' "$kept.files" | cat - "$kept.files" | sort -u >"$kept"
  mkdir -p "$root/var/lib/dpkg"
  : >"$root/var/lib/dpkg/status"
  for pkg in $(dpkg-query -W -f '${binary:Package}\n'); do
    if dpkg-query -L "$pkg" 2>/dev/null | grep -qxFf "$kept"; then
      dpkg-query -s "$pkg" >>"$root/var/lib/dpkg/status"
      echo >>"$root/var/lib/dpkg/status"
    fi
  done
  rm -f "$kept" "$kept.files" "$list"
}

# Modules the program reaches on some path but not at import time of its own modules (lazy imports); iptc
# (python-iptables) only when the project still ships it.
EXTRA_IMPORTS=ssl,http.client,http.server,socketserver,urllib.request,ctypes,ctypes.util,json,queue,difflib,codecs,base64,encodings.idna,nftables

app() {
  local root=$1 out=$2 mods trace
  mods=$(cd "$root/opt/containerboot/lib" && find containerboot firewall -name '*.py' ! -name __main__.py \
         | sed 's/\.py$//; s#/__init__$##; s#/#.#g' | sort | paste -sd,)
  [ -d "$root/opt/containerboot/lib/iptc" ] && mods+=,iptc
  trace=$(mktemp)
  # The trace: every module of the project and the extras above, then the plan command as users run it.
  if ! chroot "$root" /usr/bin/python3 -sE -X importtime -c \
      "import sys; sys.path.insert(0, '/opt/containerboot/lib'); import $mods, $EXTRA_IMPORTS" 2>>"$trace" ||
     ! chroot "$root" /usr/bin/env -i TS_TEST_FAKE_NETFILTER=true TS_USERSPACE=false TS_DEST_IP=10.0.0.5 \
      /usr/bin/python3 -sE -X importtime /usr/local/bin/containerboot plan --tailnet-ip 100.64.0.1 \
      2>>"$trace" >/dev/null ||
     ! chroot "$root" /usr/bin/python3 -sE -X importtime /usr/local/bin/containerboot --help 2>>"$trace" >/dev/null
  then
    grep -v '^import time:' "$trace" >&2
    exit 1
  fi
  echo "mkroot: $(grep -c '^import time:' "$trace") imports traced, $(find "$root" -name '*.pyc' | wc -l) modules compiled"
  rm -f "$trace"
  mkdir -p "$out/opt" "$out/usr/local/bin" "$out/tailscale"
  mv "$root/opt/containerboot" "$out/opt/"
  mv "$root/usr/local/bin/containerboot" "$out/usr/local/bin/"
  # Old operator manifests and user pods start the image with /tailscale/run.sh; upstream keeps that path.
  ln -s /usr/local/bin/containerboot "$out/tailscale/run.sh"
}

case ${1:-} in
  --app) app "$2" "$3" ;;
  -*|"") echo "usage: mkroot.sh ROOT | mkroot.sh --app ROOT APP" >&2; exit 2 ;;
  *) system "$1" ;;
esac
