"""One real JupyterHub for the whole ``tests/hub`` suite, with a class of 20 students.

Starting the Hub, 20 users' servers and their kernels costs most of the suite's time (about
half a minute on 2 cores), so they are shared: the tests use the class in turn, each leaving
every student's kernel ready for the next. The Hub runs the example's own configuration
(see :mod:`tests.hub.harness`); its log is in the scratch folder, and its tail is in every
error about it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import aiohttp
import pytest

from .harness import (
    BackgroundLoop,
    Hub,
    HubAPI,
    KernelConnection,
    MissingPrerequisite,
    SandboxAsUser,
    client_session,
    gather_all,
)

STUDENTS = [f"student{number:02d}" for number in range(1, 21)]
TEACHER = "teacher"
PER_USER_RUNS = 2


@dataclasses.dataclass
class Student:
    name: str
    token: str
    kernel: KernelConnection
    sandbox: SandboxAsUser


@dataclasses.dataclass
class Classroom:
    hub: Hub
    loop: BackgroundLoop
    http: aiohttp.ClientSession
    api: HubAPI
    students: list[Student]
    teacher: SandboxAsUser

    def student(self, name: str) -> Student:
        return next(student for student in self.students if student.name == name)


@pytest.fixture(scope="session")
def hub_loop() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def classroom(
    tmp_path_factory: pytest.TempPathFactory, hub_loop: BackgroundLoop
) -> Iterator[Classroom]:
    """The Hub, 20 students with a running server and one Sandbox kernel each, and a
    teacher (a member of the example's ``teachers`` group) with a token but no server."""
    hub = Hub(
        tmp_path_factory.mktemp("hub"),
        per_user_runs=PER_USER_RUNS,
        # Room for everyone's runs: the per-user share, not the server's slots, is under test.
        serve_args=["--workers", "8"],
        teachers=[TEACHER],
    )
    http: aiohttp.ClientSession | None = None
    leftovers: list[int] = []
    try:
        try:
            hub.start()
        except MissingPrerequisite as error:
            pytest.fail(str(error), pytrace=False)
        http = hub_loop.run(_session())
        yield hub_loop.run(_gather_class(hub, hub_loop, http))
    finally:
        if http is not None:
            hub_loop.run(http.close())
        leftovers = hub.stop()
    assert not leftovers, f"processes the Hub left behind when stopped: {leftovers}"


async def _session() -> aiohttp.ClientSession:
    return client_session()


async def _gather_class(hub: Hub, loop: BackgroundLoop, http: aiohttp.ClientSession) -> Classroom:
    api = HubAPI(hub, http)
    await api.create_users([*STUDENTS, TEACHER])
    await gather_all(api.start_server(name) for name in STUDENTS)
    students = await gather_all(_student(hub, api, http, name) for name in STUDENTS)
    teacher = SandboxAsUser(http, hub, await api.token_for(TEACHER))
    return Classroom(hub, loop, http, api, students, teacher)


async def _student(hub: Hub, api: HubAPI, http: aiohttp.ClientSession, name: str) -> Student:
    token = await api.token_for(name)
    kernel = await KernelConnection.start(http, hub, name, token)
    # The first cell waits for the kernel to be up: every test starts from a ready kernel.
    reply = await kernel.execute(f"echo ready-{name}", timeout=120)
    assert reply.stdout.strip() == f"ready-{name}", f"{name}'s first cell: {reply}"
    return Student(name, token, kernel, SandboxAsUser(http, hub, token))
