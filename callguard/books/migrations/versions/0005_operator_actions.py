"""operator actions: who booked a ledger entry and why; blocks, unblocks, kills and setting
changes with their actor and reason

Entries booked before this revision keep a NULL actor and reason (shown as unknown).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

from callguard.books.database import table_options
from callguard.books.models import Moment

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    # SQLite: ADD COLUMN in place (batch mode only rebuilds a table when it must).
    with op.batch_alter_table('ledger', schema=None) as batch_op:
        batch_op.add_column(sa.Column('actor', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('reason', sa.String(length=200), nullable=True))
    op.create_table('operator_actions',
    sa.Column('id', _ID, nullable=False),
    sa.Column('account', sa.String(length=64), nullable=False),
    sa.Column('at', Moment, nullable=False),
    sa.Column('actor', sa.String(length=100), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.String(length=200), nullable=True),
    sa.Column('session', sa.String(length=200), nullable=True),
    sa.Column('changes', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['account'], ['accounts.id'], ),
    sa.PrimaryKeyConstraint('id'),
    **table_options(op.get_bind()),
    )
    with op.batch_alter_table('operator_actions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_operator_actions_account'), ['account'],
                              unique=False)


def downgrade() -> None:
    op.drop_table('operator_actions')
    with op.batch_alter_table('ledger', schema=None) as batch_op:
        batch_op.drop_column('reason')
        batch_op.drop_column('actor')
