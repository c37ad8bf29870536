"""The VPC: private subnets for everything, and a way out only where it is paid for.

Workers, broker and result store live in private subnets across at least two
zones. How the workers reach AWS APIs and PyPI is the `nat` setting:

- none:   no internet at all; interface endpoints for the AWS APIs the workers
          call, and the artifact bucket carries every wheel (offline install);
- single: one NAT gateway (cheapest way to reach PyPI and AWS APIs over IPv4);
- per-az: one NAT gateway per zone, so losing a zone keeps the rest online;
- ipv6:   dual-stack private subnets and an egress-only internet gateway (free,
          outbound only, IPv6 only): the workers call every AWS API at its
          dual-stack endpoint (AWS_USE_DUALSTACK_ENDPOINT, set by the boot),
          IPv4 goes nowhere but inside the VPC and to S3, and the artifact
          carries every wheel. Nothing here idles at a price.

Public subnets exist only to hold NAT gateways. S3 is reached through a free
gateway endpoint in every mode.
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws


@dataclass
class NetworkArgs:
    cidr: str
    availability_zones: list[str]
    nat: str
    region: str
    # AWS services the workers call; used for interface endpoints when nat is "none".
    endpoint_services: list[str]


def allow_tcp(
    name: str,
    server_sg: pulumi.Input[str],
    client_sg: pulumi.Input[str],
    port: int,
    opts: pulumi.ResourceOptions,
) -> None:
    """Let `client_sg` open TCP connections to `server_sg` on `port`, and nothing else.

    Both halves are written down (ingress on the server, egress on the client)
    so the server's group never names a CIDR and the client cannot wander.
    """
    aws.vpc.SecurityGroupIngressRule(
        f"{name}-in",
        security_group_id=server_sg,
        referenced_security_group_id=client_sg,
        ip_protocol="tcp",
        from_port=port,
        to_port=port,
        description=f"TCP {port} from the workers only",
        opts=opts,
    )
    aws.vpc.SecurityGroupEgressRule(
        f"{name}-out",
        security_group_id=client_sg,
        referenced_security_group_id=server_sg,
        ip_protocol="tcp",
        from_port=port,
        to_port=port,
        description=f"TCP {port} to {name}",
        opts=opts,
    )


class Network(pulumi.ComponentResource):
    def __init__(self, name: str, args: NetworkArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("celery-fleet:infra:Network", name, None, opts)
        child = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(parent=self))

        dualstack = args.nat == "ipv6"
        self.vpc = aws.ec2.Vpc(
            f"{name}-vpc",
            cidr_block=args.cidr,
            # A /56 of Amazon's, for dual-stack subnets (nat: ipv6).
            assign_generated_ipv6_cidr_block=dualstack or None,
            # Interface endpoints answer on the services' public names only with DNS on.
            enable_dns_support=True,
            enable_dns_hostnames=True,
            tags={"Name": name},
            opts=child,
        )

        # The default group is what a resource gets when nobody chose one; with
        # no rules it lets nothing in or out (EC2.2).
        aws.ec2.DefaultSecurityGroup(
            f"{name}-default-sg", vpc_id=self.vpc.id, ingress=[], egress=[], opts=child
        )

        # Sixteen equal blocks: private subnets from the first eight, public from the rest.
        # StackConfig checks each private block has room for the fleet and the endpoints.
        # IPv4Network, not ip_network: config.py admits only IPv4 blocks, and so the types say.
        blocks = list(ipaddress.IPv4Network(args.cidr).subnets(prefixlen_diff=4))
        zones = list(enumerate(args.availability_zones))
        self.private_subnets = [
            aws.ec2.Subnet(
                f"{name}-private-{zone}",
                vpc_id=self.vpc.id,
                cidr_block=str(blocks[i]),
                availability_zone=zone,
                map_public_ip_on_launch=False,
                # nat: ipv6: one /64 of the VPC's /56 each, an address for every instance.
                ipv6_cidr_block=self._ipv6_block(i) if dualstack else None,
                assign_ipv6_address_on_creation=dualstack or None,
                tags={"Name": f"{name}-private-{zone}"},
                opts=child,
            )
            for i, zone in zones
        ]

        nat_gateways = self._nat_gateways(name, args, blocks, child)
        egress_only = (
            aws.ec2.EgressOnlyInternetGateway(
                f"{name}-eigw", vpc_id=self.vpc.id, tags={"Name": name}, opts=child
            )
            if dualstack
            else None
        )
        private_tables = []
        for i, zone in zones:
            routes = []
            if egress_only:
                # Out over IPv6 only; nothing from outside can open a connection in.
                routes.append(
                    aws.ec2.RouteTableRouteArgs(
                        ipv6_cidr_block="::/0", egress_only_gateway_id=egress_only.id
                    )
                )
            if nat_gateways:
                nat = nat_gateways[i] if args.nat == "per-az" else nat_gateways[0]
                routes.append(
                    aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", nat_gateway_id=nat.id)
                )
            table = aws.ec2.RouteTable(
                f"{name}-private-{zone}",
                vpc_id=self.vpc.id,
                routes=routes,
                tags={"Name": f"{name}-private-{zone}"},
                opts=child,
            )
            aws.ec2.RouteTableAssociation(
                f"{name}-private-{zone}",
                route_table_id=table.id,
                subnet_id=self.private_subnets[i].id,
                opts=child,
            )
            private_tables.append(table)

        # S3 through a gateway endpoint costs nothing and keeps artifact, result
        # and Amazon Linux package traffic off the NAT gateway's per-GB charge.
        aws.ec2.VpcEndpoint(
            f"{name}-s3",
            vpc_id=self.vpc.id,
            service_name=f"com.amazonaws.{args.region}.s3",
            vpc_endpoint_type="Gateway",
            route_table_ids=[t.id for t in private_tables],
            tags={"Name": f"{name}-s3"},
            opts=child,
        )

        self.worker_sg = aws.ec2.SecurityGroup(
            f"{name}-worker-sg",
            vpc_id=self.vpc.id,
            description="Celery workers: no inbound at all; Session Manager needs none",
            tags={"Name": f"{name}-worker"},
            opts=child,
        )
        # HTTPS out for AWS APIs, S3 and (through NAT) PyPI and OS packages; with
        # nat: ipv6 over IPv6 too, to the AWS APIs' dual-stack endpoints.
        egress: list[tuple[str, str | None, str | None, str]] = [
            ("https-out", "0.0.0.0/0", None, "HTTPS to AWS APIs and package mirrors")
        ]
        if dualstack:
            egress.append(
                ("https6-out", None, "::/0", "HTTPS to AWS dual-stack endpoints over IPv6")
            )
        for rule, ipv4, ipv6, description in egress:
            aws.vpc.SecurityGroupEgressRule(
                f"{name}-worker-{rule}",
                security_group_id=self.worker_sg.id,
                cidr_ipv4=ipv4,
                cidr_ipv6=ipv6,
                ip_protocol="tcp",
                from_port=443,
                to_port=443,
                description=description,
                opts=child,
            )

        if args.nat == "none":
            self._interface_endpoints(name, args, child)

        self.vpc_id = self.vpc.id
        self.private_subnet_ids = [s.id for s in self.private_subnets]
        self.worker_sg_id = self.worker_sg.id
        self.register_outputs(
            {
                "vpc_id": self.vpc_id,
                "private_subnet_ids": self.private_subnet_ids,
                "worker_sg_id": self.worker_sg_id,
            }
        )

    def _ipv6_block(self, index: int) -> pulumi.Output[str]:
        """The `index`th /64 of the VPC's IPv6 /56 (AWS assigns the /56 at creation)."""

        def nth(block: str) -> str:
            subnets = ipaddress.IPv6Network(block).subnets(new_prefix=64)
            return str(next(itertools.islice(subnets, index, None)))

        return self.vpc.ipv6_cidr_block.apply(nth)

    def _nat_gateways(
        self,
        name: str,
        args: NetworkArgs,
        blocks: list[ipaddress.IPv4Network],
        child: pulumi.ResourceOptions,
    ) -> list[aws.ec2.NatGateway]:
        if args.nat in ("none", "ipv6"):
            return []
        igw = aws.ec2.InternetGateway(
            f"{name}-igw", vpc_id=self.vpc.id, tags={"Name": name}, opts=child
        )
        public_table = aws.ec2.RouteTable(
            f"{name}-public",
            vpc_id=self.vpc.id,
            routes=[aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", gateway_id=igw.id)],
            tags={"Name": f"{name}-public"},
            opts=child,
        )
        nat_zones = args.availability_zones if args.nat == "per-az" else args.availability_zones[:1]
        gateways = []
        for i, zone in enumerate(nat_zones):
            subnet = aws.ec2.Subnet(
                f"{name}-public-{zone}",
                vpc_id=self.vpc.id,
                cidr_block=str(blocks[8 + i]),
                availability_zone=zone,
                # Only the NAT gateway lives here, and it brings its own Elastic IP.
                map_public_ip_on_launch=False,
                tags={"Name": f"{name}-public-{zone}"},
                opts=child,
            )
            aws.ec2.RouteTableAssociation(
                f"{name}-public-{zone}",
                route_table_id=public_table.id,
                subnet_id=subnet.id,
                opts=child,
            )
            eip = aws.ec2.Eip(
                f"{name}-nat-{zone}", domain="vpc", tags={"Name": f"{name}-nat-{zone}"}, opts=child
            )
            gateways.append(
                aws.ec2.NatGateway(
                    f"{name}-nat-{zone}",
                    allocation_id=eip.id,
                    subnet_id=subnet.id,
                    tags={"Name": f"{name}-nat-{zone}"},
                    opts=pulumi.ResourceOptions.merge(
                        child, pulumi.ResourceOptions(depends_on=[igw])
                    ),
                )
            )
        return gateways

    def _interface_endpoints(
        self, name: str, args: NetworkArgs, child: pulumi.ResourceOptions
    ) -> None:
        endpoint_sg = aws.ec2.SecurityGroup(
            f"{name}-endpoint-sg",
            vpc_id=self.vpc.id,
            description="VPC interface endpoints: HTTPS from the workers only",
            tags={"Name": f"{name}-endpoints"},
            opts=child,
        )
        # Ingress only: the workers' HTTPS egress rule already lets them out on 443.
        aws.vpc.SecurityGroupIngressRule(
            f"{name}-endpoint-https-in",
            security_group_id=endpoint_sg.id,
            referenced_security_group_id=self.worker_sg.id,
            ip_protocol="tcp",
            from_port=443,
            to_port=443,
            description="HTTPS from the workers",
            opts=child,
        )
        for service in args.endpoint_services:
            aws.ec2.VpcEndpoint(
                f"{name}-{service}",
                vpc_id=self.vpc.id,
                service_name=f"com.amazonaws.{args.region}.{service}",
                vpc_endpoint_type="Interface",
                private_dns_enabled=True,
                subnet_ids=[s.id for s in self.private_subnets],
                security_group_ids=[endpoint_sg.id],
                tags={"Name": f"{name}-{service}"},
                opts=child,
            )
