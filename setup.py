"""The optional native relay (portunus/shard/_relay.c): built when a C compiler is
present; without one the install still succeeds and shards use the Python relay."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "portunus.shard._relay",
            [
                "portunus/shard/_relay.c",
                "portunus/shard/relay_io.c",
                "portunus/shard/relay_connect.c",
                "portunus/shard/relay_udp.c",
            ],
            depends=["portunus/shard/relay.h"],
            optional=True,
            extra_compile_args=[
                "-O2",
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                "-Wno-missing-field-initializers",
            ],
        )
    ]
)
