"""A well-behaved plugin next to the broken ones: it must still load."""
from rankbench import Selector, hookimpl


class RankOne(Selector):
    name = "rank-one"

    def select(self, problem):
        return {site.name: 1 for site in problem.sites}


@hookimpl
def rankbench_register_selectors(register):
    register(RankOne)
