"""Which hosts `fleet ops` reaches, and how: SSH, through Session Manager where asked.

Hosts come from the stack's autoscaling group (by its `celery-fleet:stack`
tag; boto3) or from --hosts. The instances have no open port and no public
address: with --ssm each SSH connection goes through Session Manager, as the
ProxyCommand

    aws ssm start-session --target %h --document-name AWS-StartSSHSession \
        --parameters portNumber=%p

with the instance id as the host. The instances have no key pair either:
--push-key sends your public key with EC2 Instance Connect just before each
connection (it is honoured for 60 s). This module only assembles: discovery,
connections, the rolling order and the output; the work is in ops_tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fabric import Connection

SSM_PROXY = (
    "aws ssm start-session --target %h --document-name AWS-StartSSHSession "
    "--parameters portNumber=%p"
)


@dataclass(frozen=True)
class Host:
    address: str  # what SSH connects to: an IP, a name, or (through SSM) an instance id
    instance_id: str | None = None
    zone: str | None = None


def discover(stack: str, session: Any = None, ssm: bool = False) -> list[Host]:
    """The stack's in-service instances: by instance id (for SSM) or private address."""
    from scripts.status import stack_instances

    hosts = []
    for i in stack_instances(stack, session):
        if i["state"] != "InService":
            continue
        address = i["id"] if ssm else i["private_ip"]
        if address:
            hosts.append(Host(address, i["id"], i["zone"]))
    return hosts


def expand_proxy(template: str, host: str, port: int, user: str) -> str:
    """ssh_config's %h, %p, %r and %% in a ProxyCommand."""
    out, chars = [], iter(template)
    for c in chars:
        if c != "%":
            out.append(c)
            continue
        token = next(chars, "")
        out.append({"h": host, "p": str(port), "r": user, "%": "%"}.get(token, "%" + token))
    return "".join(out)


@dataclass
class Hosts:
    """The hosts a command runs on, and how to reach them over SSH."""

    hosts: list[Host]
    user: str = "ec2-user"
    port: int = 22
    key: str | None = None
    proxy: str | None = None  # ProxyCommand template
    push_key: Callable[[Host], None] | None = None
    connect_timeout: float = 30
    _connections: dict[str, Connection] = field(default_factory=dict)

    def connection(self, host: Host) -> Connection:
        from fabric import Connection  # an import the rest of `fleet` need not pay

        if host.address not in self._connections:
            user, _, hostport = host.address.rpartition("@")
            user = user or self.user
            address, _, port = hostport.partition(":")
            port_number = int(port) if port else self.port
            connect: dict[str, Any] = {"timeout": self.connect_timeout}
            if self.key:
                connect.update(key_filename=self.key, look_for_keys=False, allow_agent=False)
            gateway = expand_proxy(self.proxy, address, port_number, user) if self.proxy else None
            # ~/.ssh/config still applies (a Host i-* ProxyCommand, say); what is given here wins.
            self._connections[host.address] = Connection(
                address, user=user, port=port_number, connect_kwargs=connect, gateway=gateway
            )
        return self._connections[host.address]

    def close(self) -> None:
        for c in self._connections.values():
            c.close()

    def on(self, host: Host, task: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.push_key is not None:
            self.push_key(host)
        return task(self.connection(host), *args, **kwargs)


def instance_connect_pusher(key: str, user: str, session: Any = None) -> Callable[[Host], None]:
    """Send the public key of `key` to an instance with EC2 Instance Connect (valid 60 s)."""
    import boto3

    public = Path(key + ".pub").read_text().strip()
    client = (session or boto3.session.Session()).client("ec2-instance-connect")

    def push(host: Host) -> None:
        if host.instance_id:
            client.send_ssh_public_key(
                InstanceId=host.instance_id, InstanceOSUser=user, SSHPublicKey=public
            )

    return push
