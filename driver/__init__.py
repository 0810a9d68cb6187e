"""The compile driver: resolve a source once, search pass combinations, pick a Pareto point."""

from winnow.driver.search import SearchOptions, SearchResult, search_compile

__all__ = ["SearchOptions", "SearchResult", "search_compile"]
