"""Shared pieces of bench/run and bench/instructions: installing the peer
allocators, building the benchmark programs, the environment of a run and
the check that a run used the allocator it was meant to."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
# Where the peers' libraries are: Debian's, or (HAKMEM_BENCH_PEER_DIR) copies
# of them on a machine without apt.
LIBDIR = Path(os.environ.get("HAKMEM_BENCH_PEER_DIR") or "/usr/lib/x86_64-linux-gnu")

PROGRAMS = ["tiny_hot", "random_mixed", "mid_large_mt", "larson", "xmalloc",
            "cache_scratch", "realloc_grow", "large", "thread_churn", "phase_server",
            "tail_latency", "big_heap", "teardown", "program"]

PEERS = {  # name: (library, Debian package)
    "jemalloc": (LIBDIR / "libjemalloc.so.2", "libjemalloc2"),
    "tcmalloc": (LIBDIR / "libtcmalloc_minimal.so.4", "libtcmalloc-minimal4"),
    "mimalloc": (LIBDIR / "libmimalloc.so.2", "libmimalloc2.0"),
}
ALLOCATORS = ["glibc", "jemalloc", "tcmalloc", "mimalloc", "hakmem", "hakmem-ace"]
HAKMEM = ("hakmem", "hakmem-ace")


# A variant column runs hakmem (or hakmem-ace) with settings of its own, in
# the same shuffled rounds as the rest: "hakmem@HAKMEM_THP=0", or several
# settings, "hakmem-ace@HAKMEM_THP=0@HAKMEM_PURGE_DELAY_MS=100".  Two
# configurations compared in one run see the same drift of the machine;
# compared in two runs, or in pairs that always run in one order, they
# do not (a run inherits the huge pages its predecessor freed).
#
# Only the settings the library reads, each once, with the decimal value it
# parses: anything else would run as plain hakmem under a label that says
# otherwise (the library falls back to its default on a value it cannot
# read).
SETTINGS = ("HAKMEM_THP", "HAKMEM_PURGE_DELAY_MS", "HAKMEM_TCACHE_MAX_KB",
            "HAKMEM_ACE_INTERVAL_MS", "HAKMEM_STATS")


def variant(alloc):
    """(base column, {setting: value}) of a hakmem column, else None."""
    base, *settings = alloc.split("@")
    if base not in HAKMEM:
        return None
    env = {}
    for s in settings:
        key, eq, value = s.partition("=")
        if not eq or key not in SETTINGS or key in env or not value.isdigit():
            return None
        env[key] = value
    return base, env


def inherited_settings():
    """The library's settings this shell exports (every column gets them)."""
    return {k: os.environ[k] for k in SETTINGS if k in os.environ}


def is_hakmem(alloc):
    return variant(alloc) is not None


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def die(msg, code=2):
    log("\n" + "!" * 72 + "\n" + Path(sys.argv[0]).name + ": " + msg + "\n" + "!" * 72)
    sys.exit(code)


# ---- installing -----------------------------------------------------------

def apt_install(packages):
    """Installs Debian packages; runs apt-get update once if needed."""
    sudo = ["sudo"] if os.geteuid() != 0 and shutil.which("sudo") else []
    cmd = sudo + ["apt-get", "install", "-y", "--no-install-recommends"] + packages
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log("installing: " + " ".join(packages))
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode == 0:
        return True
    subprocess.run(sudo + ["apt-get", "update"], env=env, stdout=subprocess.DEVNULL)
    return subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode == 0


def ensure_peers(allocs):
    missing = [a for a in allocs if a in PEERS and not PEERS[a][0].exists()]
    if missing and not apt_install([PEERS[a][1] for a in missing]):
        die("could not install " + ", ".join(PEERS[a][1] for a in missing))
    for a in missing:
        if not PEERS[a][0].exists():
            die("%s still missing after installing %s" % (PEERS[a][0], PEERS[a][1]))


def ensure_tool(tool, package):
    """True if `tool` is on PATH, installing `package` when it is not."""
    return bool(shutil.which(tool)) or (apt_install([package]) and bool(shutil.which(tool)))


# ---- building -------------------------------------------------------------

def meson_build(build):
    """Builds with meson when the root has a meson.build; returns the
    directory holding the bench programs, or None if they are not there."""
    if not (REPO / "meson.build").exists():
        return None
    if not (build / "build.ninja").exists():
        log("meson setup %s" % build)
        if subprocess.run(["meson", "setup", str(build)], cwd=REPO).returncode != 0:
            log("warning: meson setup failed; compiling the benchmarks with cc")
            return None
    elif not (build / "bench").is_dir():
        # Configured before bench/meson.build existed: pick it up now.
        log("meson setup --reconfigure %s" % build)
        subprocess.run(["meson", "setup", "--reconfigure", str(build)], cwd=REPO,
                       stdout=subprocess.DEVNULL)
    log("meson compile -C %s" % build)
    if subprocess.run(["meson", "compile", "-C", str(build)], cwd=REPO,
                      stdout=subprocess.DEVNULL).returncode != 0:
        log("warning: meson compile failed; compiling the benchmarks with cc")
        return None
    bindir = build / "bench"
    if all((bindir / p).exists() for p in PROGRAMS):
        return bindir
    log("note: %s lacks the programs (no subdir('bench')?); using cc" % bindir)
    return None


def cc_build():
    """Plain compile into bench/.bin/, only of what is out of date."""
    bindir = BENCH_DIR / ".bin"
    bindir.mkdir(exist_ok=True)
    cc = os.environ.get("CC", "cc")
    common = [BENCH_DIR / "common.c", BENCH_DIR / "common.h"]
    for prog in PROGRAMS:
        src, out = BENCH_DIR / (prog + ".c"), bindir / prog
        newest = max(p.stat().st_mtime for p in common + [src])
        if out.exists() and out.stat().st_mtime >= newest:
            continue
        cmd = [cc, "-std=c11", "-O2", "-Wall", "-Wextra", "-D_GNU_SOURCE", "-pthread",
               "-o", str(out), str(src), str(BENCH_DIR / "common.c"), "-ldl"]
        log(" ".join(cmd))
        if subprocess.run(cmd).returncode != 0:
            die("compiling %s failed" % prog)
    return bindir


def build(build_dir, how):
    """Directory with the built programs.  how: 'auto' (meson if the root
    has a meson.build, else cc), 'cc', or 'none' (use what is built)."""
    if how == "none":
        for d in (build_dir / "bench", BENCH_DIR / ".bin"):
            if all((d / p).exists() for p in PROGRAMS):
                return d
        die("--build none: no built benchmarks in %s/bench or bench/.bin" % build_dir)
    if how == "cc":
        return cc_build()
    return meson_build(build_dir) or cc_build()


def add_build_options(ap):
    ap.add_argument("--build-dir", default="build",
                    help="meson build dir, relative to the repo (default build)")
    ap.add_argument("--build", choices=["auto", "cc", "none"], default="auto",
                    help="auto: meson (falls back to cc); cc: plain compile into "
                         "bench/.bin; none: use the programs already built")
    ap.add_argument("--lib", help="libhakmem.so to preload "
                                  "(default BUILD_DIR/libhakmem.so, i.e. build/libhakmem.so)")


def finish_build_options(opts):
    opts.build_dir = Path(os.path.abspath(os.path.join(REPO, opts.build_dir)))
    lib = opts.lib or str(opts.build_dir / "libhakmem.so")
    opts.lib = Path(os.path.abspath(os.path.join(REPO, lib)))


def check_allocator_names(spec):
    names = (spec or "").split(",") if spec else []
    bad = [a for a in names if a not in ALLOCATORS and not is_hakmem(a)]
    if bad:
        die("unknown allocator(s) %s; choose from %s, or hakmem[-ace]@SETTING=N[@...] with "
            "SETTING one of %s, each once" % (",".join(bad), ",".join(ALLOCATORS),
                                              ",".join(SETTINGS)))


def check_inherited(allocs):
    """Settings the shell exports reach every hakmem column: fine, and said,
    unless a variant column is named for another value of one."""
    inherited = inherited_settings()
    clash = sorted({k for a in allocs if variant(a) for k in variant(a)[1] if k in inherited})
    if clash:
        die("the shell exports %s, which every other hakmem column inherits: a column "
            "named for its own value would not differ as its name says.  Unset it, or "
            "make each value a variant." % " ".join("%s=%s" % (k, inherited[k]) for k in clash))
    if inherited and any(is_hakmem(a) for a in allocs):
        log("note: every hakmem column runs with %s (exported by the shell)"
            % " ".join("%s=%s" % kv for kv in sorted(inherited.items())))


def choose_allocators(spec, lib):
    """The allocator columns: all by default, without hakmem when its
    library is missing (loudly); an explicit list must be runnable."""
    check_allocator_names(spec)
    explicit = spec is not None
    allocs = spec.split(",") if explicit else list(ALLOCATORS)
    check_inherited(allocs)
    if any(is_hakmem(a) for a in allocs) and not lib.exists():
        if explicit:
            die("%s does not exist (build hakmem or pass --lib)" % lib)
        log("WARNING: %s does not exist: running without the hakmem columns" % lib)
        allocs = [a for a in allocs if not is_hakmem(a)]
    return allocs


# ---- running --------------------------------------------------------------

def allocator_env(alloc, lib):
    """Environment for a run: LD_PRELOAD and HAKMEM_ACE set only as meant,
    and a variant column's settings."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env.pop("HAKMEM_ACE", None)
    if alloc in PEERS:
        env["LD_PRELOAD"] = str(PEERS[alloc][0])
    elif is_hakmem(alloc):
        base, settings = variant(alloc)
        env["LD_PRELOAD"] = str(lib)
        if base == "hakmem-ace":
            env["HAKMEM_ACE"] = "1"
        env.update(settings)
    return env


def parse_result(stdout):
    """The key=value fields of the single RESULT line, or None."""
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    if len(lines) != 1:
        return None
    fields = {}
    for word in lines[0].split()[1:]:
        key, _, value = word.partition("=")
        fields[key] = value
    fields["_line"] = lines[0]
    return fields


def check_allocator(fields, alloc, what):
    """Stops everything if the process ran another malloc than intended."""
    want = "hakmem" if is_hakmem(alloc) else alloc
    got = fields.get("allocator")
    if got != want:
        die("%s: meant to run allocator %s but the program reports allocator=%s.\n"
            "The LD_PRELOAD did not take effect (or detection is wrong); results would "
            "be mislabelled, so nothing more is run.\nRESULT: %s"
            % (what, alloc, got, fields["_line"]), code=3)
    if is_hakmem(alloc):
        want_ace = "1" if variant(alloc)[0] == "hakmem-ace" else "0"
        if fields.get("ace") != want_ace:
            die("%s: %s expected ace=%s in the RESULT line, got ace=%s"
                % (what, alloc, want_ace, fields.get("ace")), code=3)
