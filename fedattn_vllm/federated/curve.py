"""CURVE on every ZeroMQ link: each site's own keypair, and an allow-list of the peers it accepts.

    python -m fedattn_vllm.federated.curve new coordinator --dir keys/
    # keys/coordinator.key         the public key: hand it to the peers that connect to or accept this site
    # keys/coordinator.key_secret  the keypair (mode 0600): it never leaves this site

A process that binds a socket (the coordinator, an engine's control socket) is a CURVE server:
it accepts only clients whose public key file lies in its trust directory (`--trust`), checked
by ZeroMQ's ZAP handler before any message is delivered. A process that connects pins the
server's public key (`--coordinator-key`, `--engine-keys`), so it cannot be talked to by an
impostor either. Every frame is then encrypted and authenticated (CurveZMQ: Curve25519,
XSalsa20-Poly1305). Plaintext needs an explicit `--insecure` (loopback tests only).
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


class KeyFileError(ValueError):
    """A key file or trust directory that cannot be used (missing, unreadable, or readable by others)."""


@dataclass(frozen=True, repr=False)
class Keypair:
    """A site's CURVE keypair (Z85 text, 40 bytes each); repr never shows the secret."""

    public: bytes
    secret: bytes

    @classmethod
    def load(cls, path: str | Path) -> Keypair:
        """From a `.key_secret` file that only its owner may read."""
        path = Path(path)
        try:
            mode = path.stat().st_mode
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as error:
            raise KeyFileError(f"{path}: cannot read the keypair ({error})") from None
        if secret is None:
            raise KeyFileError(f"{path}: holds no secret key (give the .key_secret file, not the public .key)")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(f"{path}: a secret key file must not be readable by others (chmod 600 {path})")
        return cls(public, secret)

    def __repr__(self) -> str:
        return f"Keypair(public={self.public.decode()})"


def public_key(path: str | Path) -> bytes:
    """The public key in a `.key` (or `.key_secret`) file."""
    try:
        return zmq.auth.load_certificate(Path(path))[0]
    except (OSError, ValueError) as error:
        raise KeyFileError(f"{path}: cannot read the public key ({error})") from None


def new_keypair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write `name.key` (public) and `name.key_secret` (0600) into `directory` (created 0700); never overwrites."""
    directory = Path(directory)
    if not name or "/" in name or name.startswith("."):
        raise KeyFileError(f"name: {name!r} is not a plain file name")
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise KeyFileError(f"{secret}: a keypair named {name!r} exists already; remove it first to replace it")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    umask = os.umask(0o077)  # the secret file is born private
    try:
        zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(umask)
    public.chmod(0o644)
    return public, secret


@dataclass(frozen=True)
class ClientCurve:
    """How a connecting socket proves who it is and checks who it reached."""

    keypair: Keypair
    server_key: bytes  # the public key of the process it connects to

    def apply(self, socket: zmq.Socket) -> None:
        """Call before `connect`."""
        socket.curve_secretkey = self.keypair.secret
        socket.curve_publickey = self.keypair.public
        socket.curve_serverkey = self.server_key


@dataclass(frozen=True)
class ServerCurve:
    """How a binding socket encrypts, and whom it lets in: the public keys in `trusted`."""

    keypair: Keypair
    trusted: Path  # a directory of `*.key` public key files

    def __post_init__(self) -> None:
        if not self.trusted.is_dir() or not any(self.trusted.glob("*.key")):
            raise KeyFileError(f"{self.trusted}: the trust directory holds no public key (*.key) files")
        try:  # ZeroMQ's authenticator only logs a file it cannot read, and would then refuse every peer
            zmq.auth.load_certificates(self.trusted)
        except (OSError, ValueError) as error:
            raise KeyFileError(f"{self.trusted}: a public key file there cannot be read ({error})") from None

    def start(self, context: zmq.Context) -> ThreadAuthenticator:
        """The allow-list check for every CURVE socket of `context`; start before `bind`, `stop` before `term`.
        The directory is read now: a peer added later is admitted after a restart."""
        authenticator = ThreadAuthenticator(context)
        authenticator.start()
        authenticator.configure_curve(domain="*", location=str(self.trusted))
        return authenticator

    def apply(self, socket: zmq.Socket) -> None:
        """Call before `bind`."""
        socket.curve_secretkey = self.keypair.secret
        socket.curve_publickey = self.keypair.public
        socket.curve_server = True


@dataclass(frozen=True)
class OrchestratorKeys:
    """What an orchestrator connects with: its keypair, and the coordinator's and each engine's public key."""

    keypair: Keypair
    coordinator: bytes
    engines: tuple[bytes, ...]  # in the order of the engine endpoints

    def to_coordinator(self) -> ClientCurve:
        return ClientCurve(self.keypair, self.coordinator)

    def to_engine(self, engine: int) -> ClientCurve:
        return ClientCurve(self.keypair, self.engines[engine])


def bind_or_close(socket: zmq.Socket, endpoint: str, authenticator: ThreadAuthenticator | None) -> None:
    """Bind; on failure (a port in use) stop the authenticator and close the socket and its context, then raise."""
    try:
        socket.bind(endpoint)
    except zmq.ZMQError:
        context = socket.context
        socket.close(0)
        if authenticator is not None:
            authenticator.stop()
        context.term()
        raise


# -- the command-line flags every process shares ------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, *, serves: bool, coordinator_client: bool) -> None:
    group = parser.add_argument_group("link security (CURVE; docs/security.md)")
    group.add_argument("--keypair", type=Path, help="this site's .key_secret file (python -m fedattn_vllm.federated.curve new)")
    if serves:
        group.add_argument("--trust", type=Path, help="directory of the public keys (*.key) allowed to connect")
    if coordinator_client:
        group.add_argument("--coordinator-key", type=Path, help="the coordinator's public key file")
    group.add_argument("--insecure", action="store_true", help="plaintext ZeroMQ, no peer authentication "
                       "(loopback tests only)")


def server_curve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ServerCurve | None:
    """The binding side's CURVE from the flags; None only with --insecure."""
    _need(args, parser, "keypair", "trust")
    return None if args.insecure else _or_exit(parser, lambda: ServerCurve(Keypair.load(args.keypair), args.trust))


def coordinator_client_curve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ClientCurve | None:
    """The connecting side's CURVE toward the coordinator; None only with --insecure."""
    _need(args, parser, "keypair", "coordinator_key")
    return None if args.insecure else _or_exit(
        parser, lambda: ClientCurve(Keypair.load(args.keypair), public_key(args.coordinator_key)))


def _need(args: argparse.Namespace, parser: argparse.ArgumentParser, *names: str) -> None:
    if args.insecure:
        return
    if missing := ["--" + name.replace("_", "-") for name in names if getattr(args, name) is None]:
        parser.error(f"encrypted links need {' and '.join(missing)} (or --insecure for plaintext on loopback)")


def _or_exit(parser: argparse.ArgumentParser, make):
    try:
        return make()
    except KeyFileError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedattn_vllm.federated.curve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="make a site's keypair")
    new.add_argument("name", help="the site's name: NAME.key and NAME.key_secret")
    new.add_argument("--dir", type=Path, default=Path("keys"), help="where to write them (created 0700)")
    args = parser.parse_args(argv)
    try:
        public, secret = new_keypair(args.dir, args.name)
    except KeyFileError as error:
        parser.error(str(error))
    print(f"public key: {public} (copy it to each peer's trust directory)\n"
          f"keypair:    {secret} (mode 0600; keep it on this site)", file=sys.stdout)


if __name__ == "__main__":
    main()
