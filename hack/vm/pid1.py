"""PID 1 of the cgroup v2 test VM, after switch_root (the host's /usr/bin/python3), or the
service that runs the command when systemd is PID 1 (PYSHIM_VM_INIT=systemd).

It prepares what systemd would (every controller enabled for the root's children, loopback
up), runs the caller's command as hack/vm/run-in-vm wrote it into the exchange share (argv,
env, cwd), reaps every orphan meanwhile (a test polling a dead daemon must not see a zombie),
then writes the command's exit status (128+N for signal N) back and powers off.  Daemons the
command left running are not waited for.

The command's stdin is /dev/null; stdout and stderr are the virtio-serial ports "vm.out" and
"vm.err", which the runner copies to its own: they are not terminals, so programs behave as
under a pipe in CI.
"""

import ctypes
import os
import termios

XFER = "/run/vm/xfer"
CGROUP = "/sys/fs/cgroup"
RB_POWER_OFF = 0x4321FEDC
EXIT_VM_FAILED = 125


def kmsg(text: str) -> None:
    """A line in the kernel log (the console log file on the host)."""
    try:
        with open("/dev/kmsg", "w") as f:
            f.write(f"pyshim-vm pid1: {text}\n")
    except OSError:
        pass


def enable_controllers() -> None:
    with open(f"{CGROUP}/cgroup.controllers") as f:
        controllers = f.read().split()
    for controller in controllers:  # one by one: a refused one must not block the others
        try:
            with open(f"{CGROUP}/cgroup.subtree_control", "w") as f:
                f.write(f"+{controller}")
        except OSError as exc:
            kmsg(f"cannot enable controller {controller}: {exc}")


def serial_port(name: str) -> int:
    for port in os.listdir("/sys/class/virtio-ports"):
        with open(f"/sys/class/virtio-ports/{port}/name") as f:
            if f.read().strip() == name:
                fd = os.open(f"/dev/{port}", os.O_WRONLY | os.O_NOCTTY)
                try:  # a virtio port is no tty; if it were one, keep "\n" as it is
                    attrs = termios.tcgetattr(fd)
                    attrs[1] &= ~termios.OPOST
                    termios.tcsetattr(fd, termios.TCSANOW, attrs)
                except termios.error:
                    pass
                return fd
    raise RuntimeError(f"no virtio-serial port {name}")


def read_xfer(name: str) -> bytes:
    with open(f"{XFER}/{name}", "rb") as f:
        return f.read()


def run_command() -> int:
    argv = read_xfer("argv").split(b"\0")[:-1]
    env = dict(kv.split(b"=", 1) for kv in read_xfer("env").split(b"\0") if b"=" in kv)
    cwd = read_xfer("cwd").decode().strip()
    out, err = serial_port("vm.out"), serial_port("vm.err")
    with open("/proc/uptime") as f:
        uptime = f.read().split()[0]
    kmsg(f"running {argv!r} in {cwd} at uptime {uptime} s")
    try:  # the boot's length, for the runner's summary line
        with open(f"{XFER}/boot_uptime", "w") as f:
            f.write(f"{uptime}\n")
    except OSError:
        pass
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.closerange(3, 1024)
            os.chdir(cwd)
            os.execvpe(argv[0], argv, env)
        except BaseException as exc:
            os.write(2, f"pyshim-vm: cannot run {argv!r}: {exc}\n".encode())
        os._exit(127)
    while True:  # reap everything; stop at the command's own exit
        try:
            reaped, status = os.wait()
        except ChildProcessError:
            return EXIT_VM_FAILED
        except InterruptedError:
            continue
        if reaped == pid:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code


def power_off(rc: int) -> None:
    try:
        with open(f"{XFER}/rc.tmp", "w") as f:
            f.write(f"{rc}\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(f"{XFER}/rc.tmp", f"{XFER}/rc")
    except OSError as exc:
        kmsg(f"cannot write the exit status: {exc}")
    os.sync()
    ctypes.CDLL(None, use_errno=True).reboot(RB_POWER_OFF)


def main() -> None:
    rc = EXIT_VM_FAILED
    try:
        if os.getpid() == 1:
            enable_controllers()
            os.system("/run/vm/busybox ip link set lo up")
        # else systemd is PID 1 (PYSHIM_VM_INIT=systemd) and we are pyshim-vm.service: systemd
        # owns the cgroup tree and brought lo up; orphans are its to reap.
        with open("/proc/sys/kernel/hostname", "w") as f:
            f.write("pyshim-vm")
        rc = run_command()
    except BaseException as exc:
        kmsg(f"failed: {exc!r}")
    power_off(rc)


main()
